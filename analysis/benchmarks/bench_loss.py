"""Peak memory and time of the chunked fused PLW loss against full logits, forward + backward.

Each (vocab, method) runs in a fresh subprocess so that one measurement cannot inherit another's
allocator state. Peak memory is what the loss itself adds on top of its inputs:

- CUDA: ``torch.cuda.max_memory_allocated()`` minus the memory allocated before the call;
- CPU: the process's peak resident set (``resource.getrusage(...).ru_maxrss``) after the call minus
  its resident set just before it (``/proc/self/statm``). Large tensors are mmap'd by the allocator,
  so their pages count in RSS while alive and leave it when freed: the high-water mark is the peak.

    python analysis/benchmarks/bench_loss.py [--tokens 2048] [--vocab 32000 128256 151936] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HIDDEN = 576  # SmolLM2-135M width


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(method: str, vocab: int, tokens: int, hidden: int, dtype_name: str, repeats: int) -> dict:
    import torch

    from plw_data.batch.loss import naive_weighted_ce_sum, weighted_ce_sum

    torch.set_num_threads(1)  # CPU time is then the busy time, steadier than wall time on a shared machine
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name)
    rows = 2
    length = tokens // rows
    h = (torch.randn(rows, length, hidden, device=device) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device) / hidden**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (rows, length), device=device)
    weights = torch.full((rows, length), 0.1, device=device)
    weights[:, length // 2 :] = 1.0  # PLW 0.1: every token is a target (worst case for the chunked loss)
    fn = weighted_ce_sum if method == "chunked" else naive_weighted_ce_sum

    def step() -> None:
        loss = fn(h, w, labels, weights)
        loss.backward()
        h.grad = w.grad = None

    if device == "cuda":
        step()  # warm-up (kernels, cuBLAS workspace)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    start, start_cpu = time.perf_counter(), time.process_time()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times, cpu_times = [time.perf_counter() - start], [time.process_time() - start_cpu]
    for _ in range(repeats - 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - start_cpu)
    return {
        "method": method,
        "vocab": vocab,
        "tokens": rows * length,
        "hidden": hidden,
        "dtype": dtype_name,
        "device": device,
        "threads": torch.get_num_threads(),
        "peak_extra_mib": round(peak / 2**20, 1),
        "time_s": round(min(times), 3),
        "cpu_time_s": round(min(cpu_times), 3),
    }


def _run(method: str, args: argparse.Namespace, vocab: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--tokens",
        str(args.tokens),
        "--hidden",
        str(args.hidden),
        "--dtype",
        args.dtype,
        "--repeats",
        str(args.repeats),
        "--vocab",
        str(vocab),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per step (2 rows); 4096 needs ~20 GB on CPU")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 49152, 128256, 151936])
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--wall", action="store_true", help="print wall time instead of CPU time (both are in the JSON)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", choices=["chunked", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.vocab[0], args.tokens, args.hidden, args.dtype, args.repeats)))
        return

    import torch

    results = []
    wall = args.wall or torch.cuda.is_available()  # CPU time means nothing for asynchronous CUDA work
    clock = "time_s" if wall else "cpu_time_s"
    print("| vocab | tokens | naive peak MiB | chunked peak MiB | memory ratio | naive s | chunked s | time ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for vocab in args.vocab:
        naive, chunked = _run("naive", args, vocab), _run("chunked", args, vocab)
        results += [naive, chunked]
        print(
            f"| {vocab} | {naive['tokens']} | {naive['peak_extra_mib']:.0f} | {chunked['peak_extra_mib']:.0f} "
            f"| {naive['peak_extra_mib'] / max(chunked['peak_extra_mib'], 1e-9):.1f}x "
            f"| {naive[clock]:.2f} | {chunked[clock]:.2f} | {chunked[clock] / naive[clock]:.2f}x |",
            flush=True,
        )
    meta = {k: results[0][k] for k in ("device", "dtype", "hidden", "threads")}
    what = "wall" if wall else "CPU"
    print(f"\n{meta}; peak = memory the loss adds on top of its inputs (fwd+bwd); {what} time, best of {args.repeats}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "loss", **meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
