"""Local trace overhead: bare PyTorch vs nnsight_dask vs the ``nnsight`` PyPI package (DESIGN.md §7, issue 21).

Each library runs in **its own process** (nnsight patches modules and torch functions when it is
imported and used; in one process each library would pay for the other's patches). A process times
the bare forward and one library's variants interleaved, each round in a random order (with a
rotating order a variant nearly always runs right after the same neighbour and finds that one's code
still in the CPU caches: "every layer, distinct prompts", always after "every layer", measured 0.3 ms
cheaper than it on GPT-2 12x256), so load hits all alike; the driver alternates the processes (ours, nnsight, ours, ...) for ``--runs``
runs each and reports medians over runs of each run's medians and paired differences.

Variants, on a tiny GPT-2 2x64, GPT-2 12x256 and SmolLM2-135M (when installed), batch 1, float32:

1. bare forward             ``with torch.no_grad(): model(**inputs)`` (inputs tokenized once, ahead)
2. one save                  ``with lm.trace(PROMPT): h = layers[mid].output.save()``
3. save every layer + set    every layer's output saved, plus ``layers[3].output[:, -1] = 0``
4. the same two with a **distinct prompt for each trace** (same token count as PROMPT), so that
   nothing helps that only a repeated prompt would (a cache of tokenizer output, say)
5. 8-token generation        greedy, ``min_new_tokens=8``, a per-step save of ``layers[mid].output[:, -1]``
                             (bare ``model.generate`` for reference)

Traces take the prompt as text, as researchers write them: tokenizing is part of a trace's cost, for
nnsight as for us. Targets (issue 21): fixed overhead (one save - bare, median paired difference)
<= 1/2 of nnsight's, and save every layer + setter on GPT-2 12x256 <= 1.10x the bare forward.

``--clock cpu`` times with the process's CPU time instead of the wall clock: on a machine whose
cores are shared, waiting for a core then adds nothing (contention in caches still does).

**Several trees in one run.** ``--compare PATH`` also runs nnsight_dask imported from another
checkout (``git worktree add /tmp/before <commit>``, or ``git archive <commit> | tar -x``) as "before",
alternating with this checkout ("ours") and nnsight, so before and after are measured in the same run;
``--compare LABEL=PATH`` names it, and the option repeats. Each process reports the nnsight_dask it
imported; the driver stops if that is not the tree it was to measure.

Usage::

    python bench/local_overhead.py                          # 3 runs per library, all models (~6 min)
    python bench/local_overhead.py --quick                  # 1 run, no SmolLM2, fewer rounds (~1 min)
    python bench/local_overhead.py --compare /tmp/before    # before/after/nnsight in one run
    python bench/local_overhead.py --profile                # cProfile ours on both target cases
"""
from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.simplefilter("ignore")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _common import git_rev, interleaved, machine, median_ms, paired_diff_ms, table, today  # noqa: E402

PROMPT = "The Eiffel Tower is in the city of"
NEW_TOKENS = 8
#: rounds per process: (forward rounds, generation rounds) per model, full and --quick
ROUNDS = {"GPT-2 2x64": (300, 40), "GPT-2 12x256": (150, 15), "SmolLM2-135M": (40, 5)}
QUICK_ROUNDS = {"GPT-2 2x64": (150, 15), "GPT-2 12x256": (50, 5)}
LAYERS = {"GPT-2 2x64": "transformer.h", "GPT-2 12x256": "transformer.h", "SmolLM2-135M": "model.layers"}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


# == one library in one process ======================================================================
def _get(obj, path: str):
    return functools.reduce(getattr, path.split("."), obj)


def _value(x):
    """A saved value: a proxy holding ``.value`` (saves kept in a list stay proxies) or the value itself."""
    if isinstance(x, list):
        return [_value(v) for v in x]
    import torch

    return x.value if hasattr(x, "value") and not isinstance(x, torch.Tensor) else x


def _close(a, b) -> bool:
    a, b = _value(a), _value(b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    import torch

    return torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-4)


def build_model(name: str):
    from nnsight_dask.models import load_smollm2, tiny_gpt2, tiny_tokenizer

    if name == "GPT-2 2x64":
        return tiny_gpt2(n_layer=2, n_embd=64), tiny_tokenizer()
    if name == "GPT-2 12x256":
        return tiny_gpt2(n_layer=12, n_embd=256), tiny_tokenizer()
    return load_smollm2()


def distinct_prompts(tok, count: int, seed: int) -> list[str]:
    """``count`` different prompts with as many tokens as :data:`PROMPT` (so the forward costs the same)."""
    length = len(tok(PROMPT)["input_ids"])
    words = sorted({w for w in tok.get_vocab() if w.isalpha() and len(w) > 2})
    rng = random.Random(seed)
    found: dict[str, None] = {}
    for _ in range(count * 50):
        prompt = f"The {rng.choice(words)} {rng.choice(words)} is in the city of"
        if prompt not in found and len(tok(prompt)["input_ids"]) == length:
            found[prompt] = None
            if len(found) == count:
                break
    if len(found) < count:
        raise RuntimeError(f"only {len(found)} distinct prompts of {length} tokens found")
    return list(found)


class Case:
    """One model and one library (``ours`` or ``nnsight``): the variants as zero-argument callables."""

    def __init__(self, name: str, library: str, rounds: int, seed: int) -> None:
        import torch

        model, tok = build_model(name)
        self.name, self.library = name, library
        self.model, self.tok = model.eval(), tok
        self.layers_path = LAYERS[name]
        enc = tok([PROMPT], return_tensors="pt")
        self.inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        self.n_layer = len(_get(model, self.layers_path))
        self.mid, self.set_at = self.n_layer // 2, min(3, self.n_layer - 1)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.gen_kwargs = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False,
                           "pad_token_id": pad}
        # enough for every call of the two distinct-prompt variants, warm-up and checks included
        self.prompts = itertools.cycle(distinct_prompts(tok, 2 * rounds + 20, seed))
        self.no_grad = torch.no_grad
        if library == "ours":
            import nnsight_dask as nd

            self.lm = nd.LanguageModel(model, tokenizer=tok)
        else:
            from nnsight import LanguageModel

            self.nn_model = copy.deepcopy(model)  # nnsight patches forwards in place: keep the bare model bare
            self.lm = LanguageModel(self.nn_model, tokenizer=tok)

    # -- bare -------------------------------------------------------------------------------------
    def bare(self):
        with self.no_grad():
            return self.model(**self.inputs)

    def bare_generate(self):
        with self.no_grad():
            return self.model.generate(**self.inputs, **self.gen_kwargs)

    # -- traces -------------------------------------------------------------------------------------
    def one(self, prompt: str = PROMPT):
        lm = self.lm
        with lm.trace(prompt):
            h = _get(lm, self.layers_path)[self.mid].output.save()
        return h

    def every(self, prompt: str = PROMPT):
        if self.library == "nnsight":
            return self._nn_every(prompt)
        lm = self.lm
        saves = []
        with lm.trace(prompt):
            layers = _get(lm, self.layers_path)
            for i in range(self.n_layer):
                if i == self.set_at:
                    layers[i].output[:, -1] = 0
                saves.append(layers[i].output.save())
        return saves

    def _nn_every(self, prompt: str):
        import nnsight

        lm = self.lm
        with lm.trace(prompt):
            layers = _get(lm, self.layers_path)
            saves = nnsight.save(list())
            for i in range(self.n_layer):
                if i == self.set_at:
                    layers[i].output[:, -1] = 0
                saves.append(layers[i].output.save())
        return saves

    def one_distinct(self):
        return self.one(next(self.prompts))

    def every_distinct(self):
        return self.every(next(self.prompts))

    def generate(self):
        lm = self.lm
        if self.library == "nnsight":
            import nnsight

            with lm.generate(PROMPT, **self.gen_kwargs) as tracer:
                steps = nnsight.save(list())
                for _ in tracer.iter[:NEW_TOKENS]:
                    steps.append(_get(lm, self.layers_path)[self.mid].output[:, -1])
            return steps
        kw = {k: v for k, v in self.gen_kwargs.items() if k not in ("max_new_tokens", "do_sample", "pad_token_id")}
        with lm.generate(PROMPT, max_new_tokens=NEW_TOKENS, **kw) as t:
            with t.all():
                s = _get(lm, self.layers_path)[self.mid].output[:, -1].save()
        return s

    # -- correctness (once, before timing) --------------------------------------------------------
    def check(self) -> list[str]:
        """Each variant against plain forward hooks on the bare model; a note per mismatch or failure."""
        layers = _get(self.model, self.layers_path)
        one, every, steps = {}, [], []

        def grab_one(_m, _i, out):
            one["h"] = (out[0] if isinstance(out, tuple) else out).detach().clone()

        def make(i):
            def hook(_m, _i, out):
                hidden = out[0] if isinstance(out, tuple) else out
                if i == self.set_at:
                    hidden = hidden.clone()
                    hidden[:, -1] = 0
                every.append(hidden.detach().clone())
                return (hidden, *out[1:]) if isinstance(out, tuple) else hidden
            return hook

        handle = layers[self.mid].register_forward_hook(grab_one)
        self.bare()
        handle.remove()
        handles = [layers[i].register_forward_hook(make(i)) for i in range(self.n_layer)]
        self.bare()
        for handle in handles:
            handle.remove()
        handle = layers[self.mid].register_forward_hook(
            lambda _m, _i, out: steps.append((out[0] if isinstance(out, tuple) else out)[:, -1].detach().clone()))
        self.bare_generate()
        handle.remove()
        notes = []
        for label, fn, ref in (("one save", self.one, one["h"]), ("all layers + setter", self.every, every),
                               ("generate", self.generate, steps)):
            try:
                if not _close(fn(), ref):
                    notes.append(f"{self.library} {label}: result differs from the plain-hook reference")
            except Exception as exc:
                notes.append(f"{self.library} {label}: failed ({type(exc).__name__}: {str(exc)[:200]})")
        return notes


def child(library: str, models: list[str], quick: bool, seed: int, clock: str) -> dict:
    """Time one library on each model (this process only): per model the times in seconds, per variant
    and round; ``imported``, the nnsight_dask package this process ran."""
    import torch

    import nnsight_dask

    torch.set_num_threads(1)
    read = CLOCKS[clock]
    out = {}
    for name in models:
        fwd_rounds, gen_rounds = (QUICK_ROUNDS if quick else ROUNDS)[name]
        case = Case(name, library, fwd_rounds, seed)
        notes = case.check()
        failed = {note.split(":")[0].split(" ", 1)[1] for note in notes if "failed" in note}
        fwd = {"bare": case.bare}
        if "one save" not in failed:
            fwd.update(one=case.one, one_distinct=case.one_distinct)
        if "all layers + setter" not in failed:
            fwd.update(every=case.every, every_distinct=case.every_distinct)
        gen = {"bare_gen": case.bare_generate}
        if "generate" not in failed:
            gen["gen"] = case.generate
        t0 = time.perf_counter()
        order = random.Random(seed)  # each round in a random order: no variant always follows the same one
        times = interleaved(fwd, budget_s=1e9, min_rounds=fwd_rounds, max_rounds=fwd_rounds, clock=read,
                            shuffle=order)
        times.update(interleaved(gen, budget_s=1e9, min_rounds=gen_rounds, max_rounds=gen_rounds, clock=read,
                                 shuffle=order))
        out[name] = {"times": times, "notes": notes, "n_layer": case.n_layer, "seconds": time.perf_counter() - t0,
                     "tokens": int(case.inputs["input_ids"].shape[1])}
    return {"imported": os.path.dirname(os.path.dirname(os.path.abspath(nnsight_dask.__file__))), "models": out}


# == the driver ======================================================================================
def tree_rev(path: str) -> str:
    """The checkout's commit, '+dirty' when its nnsight_dask/ has uncommitted changes."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=path, capture_output=True, text=True).stdout.strip()
    rev = git("rev-parse", "--short", "HEAD") or "?"
    return rev + ("+dirty" if git("status", "--porcelain", "--untracked-files=no", "nnsight_dask") else "")


def run_child(library: str, tree: str, models: list[str], quick: bool, seed: int, clock: str) -> dict:
    """One process importing nnsight_dask from ``tree`` (outside any checkout, so nothing else shadows it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, HERE])}
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", library, "--seed", str(seed),
                               "--clock", clock,
                               *(["--quick"] if quick else []), *itertools.chain(*(("--model", m) for m in models))],
                              cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{library} ({tree}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compared_tree(spec: str) -> tuple[str, str]:
    """``--compare`` ``[LABEL=]PATH`` -> (label, absolute path); the label defaults to ``before``."""
    label, _, path = spec.rpartition("=")
    return label or "before", os.path.abspath(path)


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:.0f}"


class Summary:
    """One label's runs of one model: medians over runs of each run's medians and paired differences."""

    def __init__(self, runs: list[dict]) -> None:
        self.runs = runs

    def has(self, variant: str) -> bool:
        return all(variant in run["times"] for run in self.runs)

    def median(self, variant: str) -> float | None:
        if not self.has(variant):
            return None
        return statistics.median(median_ms(run["times"][variant]) for run in self.runs)

    def extra(self, variant: str, reference: str = "bare") -> float | None:
        """Median over runs of the median per-round difference ``variant - reference`` (ms)."""
        if not self.has(variant):
            return None
        return statistics.median(paired_diff_ms(run["times"][variant], run["times"][reference]) for run in self.runs)

    def ratio(self, variant: str, reference: str = "bare") -> float | None:
        """1 + paired extra / median reference: robust to load drifting between rounds."""
        extra = self.extra(variant, reference)
        return None if extra is None else 1 + extra / self.median(reference)

    def spread(self, variant: str, reference: str = "bare") -> str:
        if not self.has(variant) or len(self.runs) < 2:
            return ""
        extras = [paired_diff_ms(run["times"][variant], run["times"][reference]) for run in self.runs]
        return f" (runs {min(extras):+.3f}..{max(extras):+.3f})"


VARIANTS = [("one save", "one", "bare"), ("save every layer + setter", "every", "bare"),
            ("one save, distinct prompt each trace", "one_distinct", "bare"),
            ("every layer + setter, distinct prompt each trace", "every_distinct", "bare"),
            (f"generate {NEW_TOKENS} tokens + per-step save", "gen", "bare_gen")]


def report(results: dict[str, dict[str, list[dict]]], labels: list[str]) -> tuple[str, list[str]]:
    """The table (ms and x bare per label) and the verdict lines against issue 21's targets."""
    rows, lines = [], []
    for model in results:
        per = {label: Summary(results[model][label]) for label in labels if results[model].get(label)}
        bare = statistics.median(s.median("bare") for s in per.values())
        bare_gen = statistics.median(s.median("bare_gen") for s in per.values())
        rows.append([model, "bare forward (each process's own)", fmt_ms(bare),
                     *(fmt_ms(per[label].median("bare")) if label in per else "n/a" for label in labels)])
        for text, variant, reference in VARIANTS:
            cells = []
            for label in labels:
                s = per.get(label)
                value, ratio = (s.median(variant), s.ratio(variant, reference)) if s else (None, None)
                cells.append("n/a" if value is None else f"{fmt_ms(value)} ({ratio:.2f}x)")
            rows.append([model, text, fmt_ms(bare_gen if reference == "bare_gen" else bare), *cells])
        for variant, what in (("one", "fixed overhead (one save - bare)"),
                              ("one_distinct", "fixed overhead, distinct prompts"),
                              ("every", "save every layer + setter - bare"),
                              ("every_distinct", "save every layer + setter - bare, distinct prompts")):
            parts = [f"{label} {s.extra(variant):+.3f} ms{s.spread(variant)}" for label, s in per.items()
                     if s.has(variant)]
            lines.append(f"  {model}: {what}: " + ", ".join(parts))
        for label in (label for label in labels if label != "nnsight" and label in per):
            ours, nn = per[label], per.get("nnsight")
            for variant, note in (("one", ""), ("one_distinct", ", distinct prompts")):
                if nn is not None and nn.has(variant) and ours.has(variant):
                    mine, theirs = ours.extra(variant), nn.extra(variant)
                    lines.append(f"{'PASS' if mine <= theirs / 2 else 'MISS'}  [{model}] {label}: fixed overhead{note} "
                                 f"<= 1/2 nnsight's: {mine:.3f} ms vs {theirs:.3f} ms ({mine / theirs:.2f}x)")
            if model == "GPT-2 12x256":
                for variant, note in (("every", ""), ("every_distinct", ", distinct prompts")):
                    ratio = ours.ratio(variant)
                    nn_ratio = nn.ratio(variant) if nn is not None else None
                    lines.append(f"{'PASS' if ratio <= 1.10 else 'MISS'}  [{model}] {label}: save every layer + "
                                 f"setter{note} <= 1.10x bare: {ratio:.3f}x"
                                 + (f" (nnsight {nn_ratio:.3f}x)" if nn_ratio is not None else ""))
        for label, s in per.items():
            for note in s.runs[0]["notes"]:
                lines.append(f"  {model}: CHECK {label}: {note}")
    headers = ["model", "variant", "bare ms", *(f"{label} ms (x bare)" for label in labels)]
    return table(headers, rows), lines


#: What ``--profile`` profiles: (model, variant), the two cases of issue 21's targets.
PROFILED = (("GPT-2 2x64", "one"), ("GPT-2 12x256", "every"))


def profile(calls: int = 300) -> int:
    """cProfile ours on the two target cases (one save on GPT-2 2x64, save every layer + setter on
    GPT-2 12x256), each with a distinct prompt per trace: self time per file and the top functions
    (all code, so the tokenizer and torch show too)."""
    import cProfile
    import io
    import pstats

    import torch

    torch.set_num_threads(1)
    for name, variant in PROFILED:
        case = Case(name, "ours", calls + 20, 0)
        fn = getattr(case, f"{variant}_distinct")
        for _ in range(20):
            fn()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
        stats = pstats.Stats(prof)
        per_file: dict[str, float] = {}
        for (filename, _line, _func), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():
            key = filename.split("nnsight_dask/", 1)[1] if "nnsight_dask/" in filename else _library(filename)
            per_file[key] = per_file.get(key, 0.0) + tottime
        total = sum(per_file.values())
        print(f"## {name}, {variant} with a distinct prompt each: {calls} traces, {total / calls * 1e3:.3f} ms "
              "per trace under cProfile (which inflates Python-heavy code)")
        print("self time per trace, by file (nnsight_dask) or library:")
        for key, seconds in sorted(per_file.items(), key=lambda kv: -kv[1])[:20]:
            print(f"  {seconds / calls * 1e6:8.1f} us  {key}")
        out = io.StringIO()
        stats.stream = out
        stats.sort_stats("tottime").print_stats(25)
        print("\n".join(line for line in out.getvalue().splitlines()[6:] if line.strip()))
    return 0


def _library(filename: str) -> str:
    """``.../site-packages/torch/nn/modules/module.py`` -> ``torch``; ``~`` (cProfile's name for C
    functions: torch's kernels, dict and list methods) -> ``C functions``."""
    if filename == "~":
        return "C functions"
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1].split("/", 1)[0]
    return os.path.basename(filename) if filename.startswith("/") else filename


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 run per library, no SmolLM2, fewer rounds")
    parser.add_argument("--runs", type=int, default=None, help="processes per library (default 3; --quick 1)")
    parser.add_argument("--no-smollm2", action="store_true", help="skip SmolLM2 even in a full run")
    parser.add_argument("--compare", metavar="[LABEL=]PATH", action="append", default=[],
                        help="also run nnsight_dask from this checkout (label 'before' unless given); repeatable")
    parser.add_argument("--tree", metavar="PATH", default=REPO, help="run 'ours' from this checkout (default: this one)")
    parser.add_argument("--no-nnsight", action="store_true", help="skip nnsight (compare trees only)")
    parser.add_argument("--json", metavar="PATH", help="save every measurement")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: the process's CPU time, which waiting for a core on a "
                             "loaded machine does not add to (nnsight's helper threads included)")
    parser.add_argument("--profile", action="store_true",
                        help="only cProfile ours on the two target cases (distinct prompts); print where the time goes")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--model", action="append", help=argparse.SUPPRESS)
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        print(json.dumps(child(args._child, args.model, args.quick, args.seed, args.clock)))
        return 0
    if args.profile:
        sys.path.insert(0, os.path.abspath(args.tree))
        return profile()
    start = time.perf_counter()
    runs = args.runs or (1 if args.quick else 3)
    sys.path.insert(0, REPO)
    from nnsight_dask.models import smollm2_available

    models = list(QUICK_ROUNDS if args.quick else ROUNDS)
    if args.quick or args.no_smollm2 or not smollm2_available():
        models = [m for m in models if m != "SmolLM2-135M"]
    try:
        import nnsight
        nn_version = getattr(nnsight, "__version__", "?")
    except Exception as exc:  # pragma: no cover - depends on the environment
        nn_version = None
        print(f"# nnsight not importable ({type(exc).__name__}: {exc}); pip install nnsight==0.8.1")
    import torch

    trees = [compared_tree(spec) for spec in args.compare]
    trees.append(("ours", os.path.abspath(args.tree)))
    contenders = [(label, "ours", path) for label, path in trees]
    if nn_version and not args.no_nnsight:
        contenders.append(("nnsight", "nnsight", REPO))
    print(f"# local_overhead  {today()}  git {git_rev()}  {'--quick' if args.quick else 'full'}, {runs} run(s) each")
    print(f"# {machine()}; torch {torch.__version__} (1 thread), nnsight {nn_version or 'not installed'}")
    for label, path in trees:
        print(f"# {label}: nnsight_dask from {path} (git {tree_rev(path)})")
    print(f"# models: {', '.join(models)}; each library in its own process, alternating; clock: {args.clock}",
          flush=True)
    results: dict[str, dict[str, list[dict]]] = {m: {label: [] for label, _, _ in contenders} for m in models}
    for run in range(runs):
        order = contenders[run % len(contenders):] + contenders[:run % len(contenders)]
        for label, library, path in order:
            t0 = time.perf_counter()
            measured = run_child(library, path, models, args.quick, seed=run, clock=args.clock)
            if library == "ours" and os.path.realpath(measured["imported"]) != os.path.realpath(path):
                raise RuntimeError(f"{label} was to run nnsight_dask from {path} but imported it from "
                                   f"{measured['imported']}")
            for model, data in measured["models"].items():
                results[model][label].append(data)
            print(f"#   run {run + 1}/{runs}: {label} {time.perf_counter() - t0:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)
    tab, lines = report(results, [label for label, _, _ in contenders])
    print()
    print(tab)
    print()
    print("\n".join(lines))
    print(f"\n# total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
