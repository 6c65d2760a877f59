"""Storage: persisted saves, lazy reads, completeness, activation datasets; local disk and S3 (moto).

Real Zarr stores on disk (``tmp_path``) and a real S3 endpoint (moto's server on 127.0.0.1, reached
through s3fs) shared with writer subprocesses. Chunk reads are counted through an fsspec filesystem
wrapper (``countfile://``), so "a slice reads only its chunks" is an exact assertion.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import fsspec
import numpy as np
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from nnsight_dask.storage import (
    CompletedResultError,
    DatasetWriter,
    IncompleteResultError,
    LazyTensor,
    ResultNotFoundError,
    StorageError,
    TensorRef,
    choose_chunks,
    cleanup,
    delete,
    delete_dataset,
    is_complete,
    list_experiments,
    mark_complete,
    ZarrSink,
    open_activations,
    open_experiment,
    prompts_digest,
    write_tensor,
)

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()


# -- a counting filesystem: how many chunk objects a computation reads ----------------------------
class CountingFS(LocalFileSystem):
    """The local filesystem under ``countfile://``, recording every whole-object read."""

    protocol = ("countfile",)
    reads: list[str] = []

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kw: Any) -> bytes:
        type(self).reads.append(path)
        return super().cat_file(path, start=start, end=end, **kw)

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, str) and path.startswith("countfile://"):
            path = path[len("countfile://"):]
        return super()._strip_protocol(path)

    @classmethod
    def chunk_reads(cls) -> list[str]:
        return [p for p in cls.reads if "/c." in p]


fsspec.register_implementation("countfile", CountingFS, clobber=True)


def counted(ref: TensorRef) -> LazyTensor:
    """Open ``ref`` through the counting filesystem, with the read log cleared."""
    lazy = dataclasses.replace(ref, url=ref.url.replace("file://", "countfile://")).open()
    CountingFS.reads.clear()
    return lazy


# -- S3: a moto server on localhost for the whole module ------------------------------------------
@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, Any]]:
    """A real S3 endpoint (moto server on 127.0.0.1) with one bucket; stopped after the module."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"}}
    # no region when creating: s3fs would send LocationConstraint=us-east-1, which S3 (and moto) reject
    fs = fsspec.filesystem("s3", **{**options, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}})
    fs.mkdir("nnsd-test")
    try:
        yield {"url": "s3://nnsd-test", "storage_options": options}
    finally:
        server.stop()


# -- writer subprocesses: load this file by path and call _child_main --------------------------------
_CHILD = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("storage_test_child", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
mod._child_main(json.loads(sys.argv[2]))
"""


def _child_main(job: dict[str, Any]) -> None:
    """Run in a subprocess: write the given dataset batches (and optionally one experiment tensor)."""
    torch.set_num_threads(1)
    writer = DatasetWriter.open(job["url"], storage_options=job.get("storage_options"))
    for batch in job["batches"]:
        acts, index = batch_data(batch)
        writer.write_batch(batch, acts, index)
    if job.get("experiment"):
        ref = write_tensor(job["experiment_url"], job["experiment"], "hidden", experiment_tensor(),
                           storage_options=job.get("storage_options"))
        mark_complete(ref.location, job["experiment"], names=["hidden"])
        print(json.dumps(ref.to_json()))


def run_children(jobs: list[dict[str, Any]], timeout: float = 90) -> list[str]:
    """Start one writer process per job, all at once; wait (bounded) and return their stdouts."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(HERE), json.dumps(job)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for job in jobs]
    outs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"writer process failed:\n{err}"
            outs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outs


# -- deterministic batch contents ---------------------------------------------------------------
HIDDEN, MLP, BATCH_PROMPTS, N_BATCHES, CAPACITY = 24, 40, 4, 8, 60
MODULES = {"model.layers.1.output": (HIDDEN, torch.float32), "model.layers.1.mlp.output": (MLP, torch.bfloat16)}
CHUNK_BYTES = 1024  # tiny chunks: every batch spans several, and slot edges are tested


def batch_tokens(batch: int) -> list[int]:
    """Tokens per prompt in ``batch`` (varies, so batches have different lengths)."""
    return [1 + (batch * 7 + p * 5) % 15 for p in range(BATCH_PROMPTS)]


def batch_data(batch: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    lengths = batch_tokens(batch)
    n = sum(lengths)
    gen = torch.Generator().manual_seed(1000 + batch)
    acts = {"model.layers.1.output": torch.randn(n, HIDDEN, generator=gen),
            "model.layers.1.mlp.output": torch.randn(n, MLP, generator=gen).to(torch.bfloat16)}
    index = torch.repeat_interleave(torch.arange(BATCH_PROMPTS) + batch * BATCH_PROMPTS, torch.tensor(lengths))
    return acts, index


def experiment_tensor() -> torch.Tensor:
    return torch.randn(6, 10, 32, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)


def new_dataset(url: str, storage_options: dict[str, Any] | None = None) -> DatasetWriter:
    return DatasetWriter.create(url, MODULES, n_batches=N_BATCHES, batch_capacity=CAPACITY,
                                metadata={"model": "tiny-llama", "tokenizer": "tiny", "n_prompts": 32,
                                          "prompts_digest": prompts_digest(f"p{i}" for i in range(32))},
                                storage_options=storage_options, target_chunk_bytes=CHUNK_BYTES)


def check_dataset(ds: Any, batches: list[int]) -> None:
    """Every row of every batch is exactly what its writer wrote: nothing lost, torn or duplicated."""
    expected = [batch_data(b) for b in batches]
    for name in MODULES:
        want = torch.cat([acts[name] for acts, _ in expected])
        assert torch.equal(ds.tensor(name).torch(), want), name
    assert np.array_equal(ds.prompt_index.compute(), torch.cat([idx for _, idx in expected]).numpy())


# ===================================== persisted saves =========================================
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64,
                                   torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn])
def test_round_trip_is_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    t = (torch.randn(5, 7, 3, generator=torch.Generator().manual_seed(0)) * 50).to(dtype)
    ref = write_tensor(tmp_path, "exp", "value", t)
    assert ref.shape == (5, 7, 3) and ref.torch_dtype == dtype and ref.url == f"file://{tmp_path}"
    back = ref.open().torch()
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))  # bit-exact, NaN patterns included
    assert torch.equal(ref.open().compute().view(torch.uint8), t.view(torch.uint8))


def test_bf16_numpy_and_dask_views_are_exact_float32(tmp_path: Path) -> None:
    t = torch.randn(4, 8).to(torch.bfloat16)
    lazy = write_tensor(tmp_path, "exp", "x", t).open()
    assert lazy.numpy().dtype == np.float32 and np.array_equal(lazy.numpy(), t.float().numpy())
    assert lazy.dask.dtype == np.float32 and np.array_equal(np.asarray(lazy), t.float().numpy())


def test_tensor_ref_is_a_small_picklable_json_value(tmp_path: Path) -> None:
    ref = write_tensor(tmp_path, "exp", "layers.3/out", torch.zeros(3, 4, dtype=torch.bfloat16))
    assert pickle.loads(pickle.dumps(ref)) == ref
    assert TensorRef.from_json(json.loads(json.dumps(ref.to_json()))) == ref
    assert ref.path == "exp/layers.3/out" and ref.nbytes == 24
    assert len(pickle.dumps(ref)) < 400


def test_default_chunks_keep_trailing_dims_whole() -> None:
    assert choose_chunks((32, 128, 4096), 4) == (2, 128, 4096)       # 4 MiB: two prompts' tokens
    assert choose_chunks((64, 1024, 576), 2, target_bytes=2 << 20) == (1, 1024, 576)
    assert choose_chunks((3, 5), 4) == (3, 5)
    assert choose_chunks((0, 5), 4) == (1, 5)


def test_names_and_ids_are_checked_before_writing(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="experiment id"):
        write_tensor(tmp_path, "../escape", "x", torch.zeros(1))
    with pytest.raises(StorageError, match="letters, digits"):
        write_tensor(tmp_path, "exp", "a/../b", torch.zeros(1))
    assert not list(tmp_path.iterdir())


def test_sink_persists_above_the_threshold_and_commits(tmp_path: Path) -> None:
    small, big = torch.zeros(4), torch.arange(1000.0)
    sink = ZarrSink(tmp_path, "exp", threshold=1000)
    assert sink.write("s", small) is small
    ref = sink.write("b", big)
    assert isinstance(ref, TensorRef)
    assert ZarrSink.from_options({}, "exp") is None  # no store: every save inline
    assert not is_complete(tmp_path, "exp")  # written, not yet visible
    assert sink.commit({"s": small, "b": [ref]}) == big.numel() * 4
    assert torch.equal(open_experiment(tmp_path, "exp")["b"].torch(), big)


def test_sink_abort_leaves_nothing_visible(tmp_path: Path) -> None:
    sink = ZarrSink(tmp_path, "exp", threshold=0)
    sink.write("b", torch.ones(10))
    sink.abort()
    assert "exp" not in list_experiments(tmp_path)


# ===================================== lazy reads ================================================
def test_slice_reads_only_the_chunks_it_covers(tmp_path: Path) -> None:
    t = torch.randn(8, 16, 64, generator=torch.Generator().manual_seed(1))
    ref = write_tensor(tmp_path, "exp", "hs", t, chunks=(2, 4, 64))  # 4 x 4 x 1 = 16 chunks

    x = counted(ref)
    assert torch.equal(x[3].torch(), t[3]) and len(CountingFS.chunk_reads()) == 4      # rows 2-3: 4 chunks

    x = counted(ref)
    assert torch.equal(x[0:2, 0:4].torch(), t[0:2, 0:4]) and len(CountingFS.chunk_reads()) == 1

    x = counted(ref)  # the example: last token, mean over the batch
    assert torch.allclose(x[:, -1].mean(0).compute(), t[:, -1].mean(0))
    assert len(CountingFS.chunk_reads()) == 4                                           # one seq-chunk per row-chunk

    x = counted(ref)
    assert torch.equal(x.torch(), t) and len(CountingFS.chunk_reads()) == 16
    assert sorted(CountingFS.chunk_reads()) == sorted(set(CountingFS.chunk_reads()))  # each chunk read once


def test_opening_reads_no_chunks(tmp_path: Path) -> None:
    ref = write_tensor(tmp_path, "exp", "hs", torch.randn(8, 64), chunks=(2, 64))
    x = counted(ref)
    y = x[1:5].mean(0)
    assert CountingFS.chunk_reads() == [] and y.shape == (64,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reductions_match_torch(tmp_path: Path, dtype: torch.dtype) -> None:
    t = torch.randn(6, 5, 8, generator=torch.Generator().manual_seed(2)).to(dtype)
    x = write_tensor(tmp_path, "exp", "x", t, chunks=(2, 5, 8)).open()
    tol = {"atol": 1e-2, "rtol": 1e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    for lazy, eager in [(x.mean(0), t.mean(0)), (x.sum((0, 1)), t.sum((0, 1))), (x.std(1), t.std(1)),
                        (x.var(-1, keepdim=True), t.var(-1, keepdim=True)), (x.amax(2), t.amax(2)),
                        (x[:, -1].mean(0), t[:, -1].mean(0)), (x.mean(), t.mean())]:
        got = lazy.compute()
        assert got.dtype == eager.dtype and got.shape == eager.shape
        assert torch.allclose(got.float(), eager.float(), **tol)
    values, indices = x.max(1)
    assert torch.equal(values.compute(), t.max(1).values) and torch.equal(indices.compute(), t.max(1).indices)
    assert torch.equal(x.min().compute(), t.min())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_functions_read_a_lazy_tensor_whole(tmp_path: Path, dtype: torch.dtype) -> None:
    """A persisted save handed to torch (``as_tensor``, ``tensor``, any torch function) is read whole,
    in its own dtype: code written for saved tensors runs unchanged on lazy ones."""
    t = torch.randn(3, 4, 5).to(dtype)
    x = write_tensor(tmp_path, "exp", "x", t).open()
    for got in (torch.as_tensor(x), torch.tensor(x)):
        assert got.dtype == dtype and torch.equal(got, t)
    assert torch.equal(torch.softmax(x, -1), torch.softmax(t, -1))
    assert torch.equal(torch.cat([x, x[:1]]), torch.cat([t, t[:1]]))
    assert torch.equal(torch.as_tensor(x[1, -1]), t[1, -1])


def test_lazy_indexing_like_torch(tmp_path: Path) -> None:
    t = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    x = write_tensor(tmp_path, "exp", "x", t).open()
    assert x.shape == torch.Size([3, 4, 5]) and x.dtype == torch.float32 and len(x) == 3
    assert torch.equal(x[..., ::-1][:, None, 1].torch(), t.flip(-1)[:, None, 1])
    assert torch.equal(x[torch.tensor([2, 0])].torch(), t[torch.tensor([2, 0])])
    assert "shape=(3, 4, 5)" in repr(x) and "torch.float32" in repr(x) and "exp/x" in repr(x)


# ===================================== completeness ==============================================
def test_results_are_visible_only_when_complete(tmp_path: Path) -> None:
    write_tensor(tmp_path, "exp", "a", torch.ones(3))
    write_tensor(tmp_path, "exp", "b", torch.zeros(2, dtype=torch.bfloat16))
    assert not is_complete(tmp_path, "exp")
    with pytest.raises(IncompleteResultError, match="not complete"):
        open_experiment(tmp_path, "exp")
    assert set(open_experiment(tmp_path, "exp", allow_incomplete=True)) == {"a", "b"}

    with pytest.raises(IncompleteResultError, match=r"\['c'\] are missing"):  # a shard's save never arrived
        mark_complete(tmp_path, "exp", names=["a", "b", "c"])
    assert not is_complete(tmp_path, "exp")

    assert mark_complete(tmp_path, "exp", names=["a", "b"]) == ["a", "b"]
    exp = open_experiment(tmp_path, "exp")
    assert is_complete(tmp_path, "exp") and exp.complete and sorted(exp) == ["a", "b"]
    assert torch.equal(exp["b"].torch(), torch.zeros(2, dtype=torch.bfloat16))
    with pytest.raises(CompletedResultError, match="immutable"):
        write_tensor(tmp_path, "exp", "a", torch.zeros(3))


def test_failed_experiment_leaves_nothing_that_looks_complete(tmp_path: Path) -> None:
    write_tensor(tmp_path, "failed", "a", torch.ones(3))   # ... then the shard died: never marked
    assert not is_complete(tmp_path, "failed") and list_experiments(tmp_path)["failed"]["complete"] is False
    with pytest.raises(ResultNotFoundError):
        open_experiment(tmp_path, "never-ran")
    with pytest.raises(FileNotFoundError):  # also the builtin a caller would catch
        open_experiment(tmp_path, "never-ran")


def test_delete_and_ttl_cleanup(tmp_path: Path) -> None:
    for exp in ("old", "new", "failed"):
        write_tensor(tmp_path, exp, "x", torch.ones(2))
    mark_complete(tmp_path, "old")
    mark_complete(tmp_path, "new")
    assert cleanup(tmp_path, timedelta(hours=1)) == []            # nothing is an hour old yet
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    assert cleanup(tmp_path, timedelta(hours=1), now=later) == ["failed", "new", "old"]
    assert list_experiments(tmp_path) == {} and not (tmp_path / "old").exists()

    ref = write_tensor(tmp_path, "gone", "x", torch.ones(2))
    mark_complete(tmp_path, "gone")
    assert delete(tmp_path, "gone") is True and delete(tmp_path, "gone") is False
    with pytest.raises(ResultNotFoundError):
        open_experiment(tmp_path, "gone")
    with pytest.raises(ResultNotFoundError, match="never written, or was deleted"):
        ref.open()


def test_interrupted_delete_is_finished_by_cleanup(tmp_path: Path) -> None:
    import zarr

    write_tensor(tmp_path, "exp", "x", torch.ones(2))
    mark_complete(tmp_path, "exp")
    group = zarr.open_group(str(tmp_path), path="exp", mode="r+")   # delete's first step, then a crash
    group.update_attributes({"nnsight_dask": {**group.attrs["nnsight_dask"], "complete": False, "deleting": True}})
    assert not is_complete(tmp_path, "exp")
    assert cleanup(tmp_path, timedelta(days=1)) == ["exp"]


def test_storage_errors_pickle_with_their_fields(tmp_path: Path) -> None:
    with pytest.raises(IncompleteResultError) as info:
        write_tensor(tmp_path, "exp", "a", torch.ones(1))
        open_experiment(tmp_path, "exp")
    err = pickle.loads(pickle.dumps(info.value))
    assert type(err) is IncompleteResultError and err.experiment_id == "exp" and "not complete" in str(err)


# ===================================== activation datasets ======================================
def test_dataset_round_trip_and_metadata(tmp_path: Path) -> None:
    url = str(tmp_path / "acts.zarr")
    writer = new_dataset(url)
    for batch in writer.pending_batches():
        writer.write_batch(batch, *batch_data(batch))
    ds = writer.finalize()
    assert ds.modules == list(MODULES) and ds.complete
    assert ds.n_tokens == sum(sum(batch_tokens(b)) for b in range(N_BATCHES))
    assert ds["model.layers.1.output"].shape == (ds.n_tokens, HIDDEN)
    assert ds["model.layers.1.mlp.output"].dtype == np.float32     # bf16 values, exactly, as float32
    check_dataset(open_activations(url), list(range(N_BATCHES)))
    meta = open_activations(url).metadata
    assert meta["model"] == "tiny-llama" and meta["tokenizer"] == "tiny"
    assert meta["prompts_digest"].startswith("sha256:")
    assert datetime.fromisoformat(meta["created_at"]).tzinfo is not None
    rows = ds.prompt_rows()
    assert rows[5] == slice(sum(batch_tokens(0)) + batch_tokens(1)[0], sum(batch_tokens(0)) + sum(batch_tokens(1)[:2]))


def test_dataset_chunks_suit_per_token_and_per_prompt_reads(tmp_path: Path) -> None:
    writer = new_dataset(str(tmp_path / "acts.zarr"))
    spec = writer.layout.module("model.layers.1.output")
    assert spec.chunk_rows * HIDDEN * 4 <= CHUNK_BYTES and writer.layout.slot_rows % spec.chunk_rows == 0
    default = DatasetWriter.create(tmp_path / "big.zarr", {"h": (4096, torch.bfloat16)}, n_batches=2,
                                   batch_capacity=32 * 512).layout.module("h")
    assert default.chunk_rows == 512  # 4 MiB of bf16 rows, whole hidden dim: a token is in one chunk


def test_incomplete_dataset_is_refused_unless_asked(tmp_path: Path) -> None:
    url = str(tmp_path / "acts.zarr")
    writer = new_dataset(url)
    for batch in (1, 4):
        writer.write_batch(batch, *batch_data(batch))
    with pytest.raises(IncompleteResultError, match="2 of 8 batches"):
        open_activations(url)
    with pytest.raises(IncompleteResultError, match="6 of 8 batches are not written"):
        writer.finalize()
    partial = open_activations(url, allow_incomplete=True)
    assert not partial.complete and partial.batches == [1, 4]
    check_dataset(partial, [1, 4])
    with pytest.raises(ResultNotFoundError):
        open_activations(tmp_path / "nothing.zarr")


def test_resume_writes_each_unfinished_batch_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = str(tmp_path / "acts.zarr")
    first = new_dataset(url)
    for batch in (0, 2, 5):
        first.write_batch(batch, *batch_data(batch))
    # interrupted in the middle of batch 3: some rows written (garbage), no marker
    first._write_rows("model.layers.1.output", first.layout.slot_start(3), np.full((9, HIDDEN), 7.0, np.float32),
                      first.layout.module("model.layers.1.output").chunk_rows, 0)
    stamps = {b: m["written_at"] for b, m in first.location.list_json("_batches").items()}

    rerun = new_dataset(url)                           # the same call again: reopens, does not recreate
    assert rerun.pending_batches() == [1, 3, 4, 6, 7]
    written: list[int] = []
    original = DatasetWriter.write_batch

    def counting(self: DatasetWriter, batch: int, *args: Any) -> int:
        written.append(batch)
        return original(self, batch, *args)

    monkeypatch.setattr(DatasetWriter, "write_batch", counting)
    for batch in rerun.pending_batches():
        rerun.write_batch(batch, *batch_data(batch))
    ds = rerun.finalize()
    assert written == [1, 3, 4, 6, 7] and rerun.pending_batches() == []
    assert {b: m["written_at"] for b, m in rerun.location.list_json("_batches").items() if b in stamps} == stamps
    check_dataset(ds, list(range(N_BATCHES)))
    counts = np.bincount(ds.prompt_index.compute())
    assert counts.tolist() == [n for b in range(N_BATCHES) for n in batch_tokens(b)]  # no prompt twice
    assert new_dataset(url).pending_batches() == []    # a third run has nothing to do


def test_dataset_writes_are_checked(tmp_path: Path) -> None:
    url = str(tmp_path / "acts.zarr")
    writer = new_dataset(url)
    acts, index = batch_data(0)
    with pytest.raises(StorageError, match="missing"):
        writer.write_batch(0, {"model.layers.1.output": acts["model.layers.1.output"]}, index)
    with pytest.raises(StorageError, match="dtype torch.float32 differs"):
        writer.write_batch(0, {**acts, "model.layers.1.mlp.output": acts["model.layers.1.mlp.output"].float()}, index)
    with pytest.raises(StorageError, match="batch_capacity"):
        writer.write_batch(0, {k: v.repeat(4, 1) for k, v in acts.items()}, index.repeat(4))
    with pytest.raises(StorageError, match="out of range"):
        writer.write_batch(N_BATCHES, acts, index)
    with pytest.raises(StorageError, match="a different activation dataset"):
        DatasetWriter.create(url, {"other": (3, torch.float32)}, n_batches=2, batch_capacity=10)
    with pytest.raises(StorageError, match="prompts_digest"):
        DatasetWriter.create(url, MODULES, n_batches=N_BATCHES, batch_capacity=CAPACITY,
                             metadata={"prompts_digest": prompts_digest(["other prompts"])})
    for batch in range(N_BATCHES):
        writer.write_batch(batch, *batch_data(batch))
    writer.finalize()
    with pytest.raises(CompletedResultError):
        writer.write_batch(0, acts, index)
    assert delete_dataset(url) and not delete_dataset(url)
    with pytest.raises(ResultNotFoundError):
        open_activations(url)


def test_concurrent_writer_processes_lose_and_tear_nothing(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/acts.zarr"
    writer = new_dataset(url)
    order = [5, 0, 7, 2, 3, 6, 1, 4]                         # interleaved: neighbours written by others
    run_children([{"url": url, "batches": order[k::3]} for k in range(3)])
    assert writer.pending_batches() == []
    check_dataset(writer.finalize(), list(range(N_BATCHES)))


# ===================================== S3 (moto server) =========================================
def test_s3_store_shared_by_processes(s3: dict[str, Any]) -> None:
    url, options = f"{s3['url']}/run1.zarr", s3["storage_options"]
    writer = new_dataset(url, options)
    jobs = [{"url": url, "storage_options": options, "batches": [0, 2, 4, 6]},
            {"url": url, "storage_options": options, "batches": [1, 3, 5, 7],
             "experiment": "exp-1", "experiment_url": f"{s3['url']}/results"}]
    outs = run_children(jobs)
    ref = TensorRef.from_json(json.loads(outs[1].strip().splitlines()[-1]))   # what a shard would return
    assert ref.url == f"{s3['url']}/results" and ref.torch_dtype == torch.bfloat16

    lazy = ref.open()
    assert torch.equal(lazy.torch(), experiment_tensor())
    assert torch.equal(lazy[:, -1].mean(0).compute(), experiment_tensor()[:, -1].mean(0))
    assert is_complete(ref.url, "exp-1", storage_options=options)

    ds = writer.finalize()
    check_dataset(open_activations(url, storage_options=options), list(range(N_BATCHES)))
    assert ds.n_tokens == sum(sum(batch_tokens(b)) for b in range(N_BATCHES))

    assert delete(ref.url, "exp-1", storage_options=options)
    assert list_experiments(ref.url, storage_options=options) == {}
    assert delete_dataset(url, storage_options=options)
    with pytest.raises(ResultNotFoundError):
        open_activations(url, storage_options=options)


def test_memory_store_is_flagged_process_local() -> None:
    from nnsight_dask.storage import StoreLocation

    assert not StoreLocation("memory://x").shared_across_processes
    assert StoreLocation("s3://b/x").shared_across_processes and StoreLocation("rel/dir").url.startswith("file:///")
