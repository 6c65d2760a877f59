"""Local trace overhead: bare PyTorch vs nnsight_dask vs the ``nnsight`` PyPI package (DESIGN.md §7).

For each model (tiny GPT-2 2x64, GPT-2 12x256, SmolLM2-135M when installed) this measures, in one run
and interleaved round-robin so background load hits every variant alike:

1. bare forward            ``with torch.no_grad(): model(**inputs)``
2. one save                 ``layers[mid].output.save()``
3. save every layer + set   every layer's output saved, plus ``layers[3].output[:, -1] = 0``
4. 8-token generation       greedy, ``min_new_tokens=8``, a per-step save of ``layers[mid].output[:, -1]``
                            (bare ``model.generate`` for reference)

each with ours (``nnsight_dask``) and with ``nnsight`` (``pip install nnsight==0.8.1``, the ``bench``
extra). nnsight patches the wrapped modules' ``forward`` in place, so it wraps a deep copy of the model
(same weights); the bare forward of that patched copy is printed too.

Usage::

    python bench/local_overhead.py            # all models, < 5 minutes
    python bench/local_overhead.py --quick    # skip SmolLM2, fewer repetitions, < 1 minute
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
import time
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.simplefilter("ignore")

import torch  # noqa: E402

torch.set_num_threads(1)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import git_rev, interleaved, machine, median_ms, paired_diff_ms, ratio_ci, table, today  # noqa: E402

import nnsight_dask as nd  # noqa: E402
from nnsight_dask.models import load_smollm2, smollm2_available, tiny_gpt2, tiny_tokenizer  # noqa: E402

try:
    import nnsight  # noqa: E402
    from nnsight import LanguageModel as NNsightLM  # noqa: E402
    NNSIGHT_ERROR = None
    NNSIGHT_VERSION = getattr(nnsight, "__version__", "?")
except Exception as exc:  # pragma: no cover - depends on the environment
    nnsight = None
    NNsightLM = None
    NNSIGHT_ERROR = f"nnsight not importable ({type(exc).__name__}: {exc}); pip install nnsight==0.8.1"
    NNSIGHT_VERSION = None

PROMPT = "The Eiffel Tower is in the city of"
NEW_TOKENS = 8


def _get(obj, path: str):
    return functools.reduce(getattr, path.split("."), obj)


def _value(x):
    """A saved value: ours returns a Proxy holding ``.value`` after the trace; nnsight the value itself."""
    if isinstance(x, list):
        return [_value(v) for v in x]
    return x.value if hasattr(x, "value") and not isinstance(x, torch.Tensor) else x


def _close(a, b) -> bool:
    a, b = _value(a), _value(b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-4)


class Case:
    """One model: its variants as zero-argument callables."""

    def __init__(self, name: str, model: torch.nn.Module, tok, layers_path: str) -> None:
        self.name = name
        self.model = model.eval()
        self.tok = tok
        self.layers_path = layers_path
        enc = tok([PROMPT], return_tensors="pt")
        self.inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        self.n_layer = len(_get(model, layers_path))
        self.mid = self.n_layer // 2
        self.set_at = min(3, self.n_layer - 1)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.gen_kwargs = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False,
                           "pad_token_id": pad}
        self.ours = nd.LanguageModel(model, tokenizer=tok)
        self.nn = None
        self.nn_model = None
        self.nn_error = NNSIGHT_ERROR
        if NNsightLM is not None:
            try:
                self.nn_model = copy.deepcopy(model)
                self.nn = NNsightLM(self.nn_model, tokenizer=tok)
            except Exception as exc:
                self.nn_error = f"nnsight could not wrap the model: {type(exc).__name__}: {exc}"
        self.nn_errors: dict[str, str] = {}

    # -- bare -------------------------------------------------------------------------------------
    def bare_forward(self):
        with torch.no_grad():
            return self.model(**self.inputs)

    def bare_forward_nncopy(self):
        with torch.no_grad():
            return self.nn_model(**self.inputs)

    def bare_generate(self):
        with torch.no_grad():
            return self.model.generate(**self.inputs, **self.gen_kwargs)

    # -- ours -------------------------------------------------------------------------------------
    def ours_one(self):
        lm = self.ours
        with lm.trace(self.inputs):
            h = _get(lm, self.layers_path)[self.mid].output.save()
        return h

    def ours_all(self):
        lm = self.ours
        saves = []
        with lm.trace(self.inputs):
            layers = _get(lm, self.layers_path)
            for i in range(self.n_layer):
                if i == self.set_at:
                    layers[i].output[:, -1] = 0
                saves.append(layers[i].output.save())
        return saves

    def ours_generate(self):
        lm = self.ours
        kw = {k: v for k, v in self.gen_kwargs.items() if k not in ("max_new_tokens", "do_sample", "pad_token_id")}
        with lm.generate(self.inputs, max_new_tokens=NEW_TOKENS, **kw) as t:
            with t.all():
                s = _get(lm, self.layers_path)[self.mid].output[:, -1].save()
        return s

    # -- nnsight (public API of nnsight 0.8.1) ----------------------------------------------------
    def nn_one(self):
        lm = self.nn
        with lm.trace(self.inputs):
            h = _get(lm, self.layers_path)[self.mid].output.save()
        return h

    def nn_all(self):
        lm = self.nn
        with lm.trace(self.inputs):
            layers = _get(lm, self.layers_path)
            saves = nnsight.save(list())
            for i in range(self.n_layer):
                if i == self.set_at:
                    layers[i].output[:, -1] = 0
                saves.append(layers[i].output.save())
        return saves

    def nn_generate(self):
        lm = self.nn
        with lm.generate(self.inputs, **self.gen_kwargs) as tracer:
            steps = nnsight.save(list())
            for _ in tracer.iter[:NEW_TOKENS]:
                steps.append(_get(lm, self.layers_path)[self.mid].output[:, -1])
        return steps

    # -- correctness (once, before timing) --------------------------------------------------------
    def reference(self):
        """Plain-torch-hook reference for the one-save, all-layers+setter and generation variants."""
        layers = _get(self.model, self.layers_path)
        one, every, steps = {}, [], []

        def grab_one(_m, _i, out):
            one["h"] = out.detach().clone()

        h = layers[self.mid].register_forward_hook(grab_one)
        self.bare_forward()
        h.remove()

        def make(i):
            def hook(_m, _i, out):
                if i == self.set_at:
                    out = out.clone()
                    out[:, -1] = 0
                every.append(out.detach().clone())
                return out
            return hook

        hs = [layers[i].register_forward_hook(make(i)) for i in range(self.n_layer)]
        self.bare_forward()
        for x in hs:
            x.remove()
        h = layers[self.mid].register_forward_hook(lambda _m, _i, out: steps.append(out[:, -1].detach().clone()))
        self.bare_generate()
        h.remove()
        return one["h"], every, steps

    def check(self) -> list[str]:
        notes = []
        ref_one, ref_all, ref_steps = self.reference()
        got = {"ours": (self.ours_one, self.ours_all, self.ours_generate)}
        if self.nn is not None:
            got["nnsight"] = (self.nn_one, self.nn_all, self.nn_generate)
        for who, (one, every, gen) in got.items():
            for label, fn, ref in (("one save", one, ref_one), ("all layers + setter", every, ref_all),
                                   ("generate", gen, ref_steps)):
                try:
                    out = fn()
                    if not _close(out, ref):
                        notes.append(f"{who} {label}: result differs from the plain-hook reference")
                except Exception as exc:
                    msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                    notes.append(f"{who} {label}: failed ({msg})")
                    if who == "nnsight":
                        self.nn_errors[label] = msg
                    else:
                        raise
        return notes


def run_case(case: Case, fwd_budget: float, gen_budget: float, max_rounds: int) -> dict:
    notes = case.check()
    fwd = {"bare": case.bare_forward, "ours_one": case.ours_one, "ours_all": case.ours_all}
    gen = {"bare_gen": case.bare_generate, "ours_gen": case.ours_generate}
    if case.nn is not None:
        fwd["bare_nncopy"] = case.bare_forward_nncopy
        if "one save" not in case.nn_errors:
            fwd["nn_one"] = case.nn_one
        if "all layers + setter" not in case.nn_errors:
            fwd["nn_all"] = case.nn_all
        if "generate" not in case.nn_errors:
            gen["nn_gen"] = case.nn_generate
    t0 = time.perf_counter()
    times = interleaved(fwd, budget_s=fwd_budget, max_rounds=max_rounds)
    times.update(interleaved(gen, budget_s=gen_budget, max_rounds=max(10, max_rounds // 4), min_rounds=3))
    return {"times": times, "notes": notes, "elapsed": time.perf_counter() - t0,
            "rounds": (len(times["bare"]), len(times["bare_gen"]))}


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def report(results: list[tuple[Case, dict]]) -> tuple[str, list[str], bool]:
    rows = []
    summary = []
    targets = []
    for case, res in results:
        t = res["times"]
        med = {k: median_ms(v) for k, v in t.items()}
        bare, bare_gen = med["bare"], med["bare_gen"]

        def nn(key):
            return med.get(key)

        def why(label):
            return case.nn_errors.get(label) or case.nn_error

        for label, ours_key, nn_key, ref, err in (
            ("bare forward (nnsight col: its patched copy)", "bare", None, bare, None),
            ("one save", "ours_one", "nn_one", bare, "one save"),
            (f"save all {case.n_layer} layers + setter", "ours_all", "nn_all", bare, "all layers + setter"),
            (f"generate {NEW_TOKENS} tok + per-step save", "ours_gen", "nn_gen", bare_gen, "generate"),
        ):
            o = med[ours_key]
            n = nn(nn_key) if nn_key else (nn("bare_nncopy") if case.nn is not None else None)
            rows.append([case.name, label, fmt_ms(ref if ours_key != "bare" else bare), fmt_ms(o),
                         fmt_ratio(o / ref), fmt_ms(n), fmt_ratio(n / ref if n is not None else None)])
            if nn_key and n is None:
                summary.append(f"  {case.name}: nnsight {label}: not run ({why(err)})")
        ours_fixed = paired_diff_ms(t["ours_one"], t["bare"])
        nn_fixed = paired_diff_ms(t["nn_one"], t["bare"]) if "nn_one" in t else None
        ours_all_extra = paired_diff_ms(t["ours_all"], t["bare"])
        nn_all_extra = paired_diff_ms(t["nn_all"], t["bare"]) if "nn_all" in t else None
        line = (f"  {case.name}: fixed per-trace overhead (one save - bare, median paired diff): ours "
                f"{ours_fixed:+.3f} ms, nnsight {'n/a' if nn_fixed is None else f'{nn_fixed:+.3f} ms'}")
        if nn_fixed:
            line += f"  (ours/nnsight = {ours_fixed / nn_fixed:.2f})"
        summary.append(line)
        summary.append(f"  {case.name}: save-all+setter extra over bare: ours {ours_all_extra:+.3f} ms, nnsight "
                       f"{'n/a' if nn_all_extra is None else f'{nn_all_extra:+.3f} ms'}; rounds fwd/gen = "
                       f"{res['rounds'][0]}/{res['rounds'][1]}, {res['elapsed']:.1f} s")
        if nn_fixed is not None:
            targets.append((f"[{case.name}] ours fixed per-trace overhead <= 1/2 of nnsight's "
                            f"({ours_fixed:.3f} ms vs {nn_fixed / 2:.3f} ms)", ours_fixed <= nn_fixed / 2))
        if case.name.startswith("GPT-2 12x256"):
            # Judged on 1 + median paired (per-round) difference / median bare: robust to load drifts
            # between rounds. The plain ratio of medians and its bootstrap CI are printed alongside.
            paired = 1 + ours_all_extra / bare
            ratio = med["ours_all"] / bare
            lo, hi = ratio_ci(t["ours_all"], t["bare"])
            targets.append((f"[{case.name}] ours save-every-layer + setter <= 1.10x bare forward "
                            f"({paired:.3f}x from paired diffs; ratio of medians {ratio:.3f}x, "
                            f"95% CI {lo:.3f}-{hi:.3f})", paired <= 1.10))
        for note in res["notes"]:
            summary.append(f"  {case.name}: CHECK {note}")
    headers = ["model", "variant", "bare ms", "ours ms", "ours/bare", f"nnsight ms", "nnsight/bare"]
    tab = table(headers, rows)
    lines = [f"{'PASS' if ok else 'MISS'}  {text}" for text, ok in targets]
    return tab, summary + [""] + lines, all(ok for _, ok in targets)


def profile(calls: int = 300) -> int:
    """cProfile our save-every-layer + setter trace on GPT-2 12x256; print the hotspots under nnsight_dask/."""
    import cProfile
    import io
    import pstats

    case = Case("GPT-2 12x256", tiny_gpt2(n_layer=12, n_embd=256), tiny_tokenizer(), "transformer.h")
    case.nn = None
    for _ in range(20):
        case.ours_all()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        case.ours_all()
    prof.disable()
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(order).print_stats("nnsight_dask", 20)
        print(f"## {calls} traces, sorted by {order} (cProfile inflates Python-heavy code)")
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip SmolLM2 and use fewer repetitions (< 1 min)")
    parser.add_argument("--no-smollm2", action="store_true", help="skip SmolLM2 even in a full run")
    parser.add_argument("--profile", action="store_true",
                        help="only cProfile ours on GPT-2 12x256 save-every-layer + setter; print nnsight_dask hotspots")
    args = parser.parse_args(argv)
    if args.profile:
        return profile()
    start = time.perf_counter()
    scale = 0.25 if args.quick else 1.0
    print(f"# local_overhead  {today()}  git {git_rev()}  {'--quick' if args.quick else 'full'}")
    print(f"# {machine()}; torch {torch.__version__} (threads={torch.get_num_threads()}), "
          f"nnsight {NNSIGHT_VERSION or 'not installed'}")
    if NNSIGHT_ERROR:
        print(f"# {NNSIGHT_ERROR}")
    tok = tiny_tokenizer()
    plan = [("GPT-2 2x64", lambda: (tiny_gpt2(n_layer=2, n_embd=64), tok), "transformer.h", 20, 10, 2000),
            ("GPT-2 12x256", lambda: (tiny_gpt2(n_layer=12, n_embd=256), tok), "transformer.h", 45, 25, 1000)]
    if args.quick or args.no_smollm2:
        print("# SmolLM2: skipped (--quick)" if args.quick else "# SmolLM2: skipped (--no-smollm2)")
    elif smollm2_available():
        plan.append(("SmolLM2-135M", load_smollm2, "model.layers", 50, 40, 200))
    else:
        print("# SmolLM2: not installed (see nnsight_dask.models.SMOLLM2_INSTALL); skipped")
    results = []
    for name, build, path, fwd_b, gen_b, max_rounds in plan:
        model, tk = build()
        case = Case(name, model, tk, path)
        print(f"# {name}: {case.n_layer} layers, prompt {case.inputs['input_ids'].shape[1]} tokens ...",
              flush=True)
        results.append((case, run_case(case, fwd_b * scale, gen_b * scale, max_rounds)))
    tab, summary, ok = report(results)
    print()
    print(tab)
    print()
    print("\n".join(summary))
    print(f"\n# total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
