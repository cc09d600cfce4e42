"""`python -m bench.peers.child ENGINE WEIGHTS [options]`: one peer in one fresh process.

Decoders: the prompt's token ids (from --reference, a JSON file), then --new-tokens greedy tokens,
end-of-sequence ignored; the record gives the load time, the time to first token (the prompt
pass), each later token's time and the new ids. Encoders: --passes forward passes of the
reference's inputs; the first pass's time and the later ones', and the outputs' checksums.
Each engine imports only its own library (and hermes_ort.measure.fresh_process, the protocol
only)."""

from __future__ import annotations

import time

T_START = time.time()  # noqa: E402

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402


class _Clock:
    """Times of a generation: start, then each token as it is chosen."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.marks: list[float] = []

    def tick(self) -> None:
        self.marks.append(time.perf_counter())

    def record(self) -> dict[str, Any]:
        ttft = self.marks[0] - self.t0 if self.marks else None
        steps = [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return {"time_to_first_token_s": ttft, "token_s": steps}


# -- decoders --------------------------------------------------------------------------------------
def hermes_ort(args, prompt: list[int]) -> dict[str, Any]:
    import hermes_ort

    budget = args.budget
    model = hermes_ort.load(args.weights, memory_budget=budget, strategy=args.strategy)
    loaded = time.perf_counter()
    clock = _Clock()
    with model:
        ids = model.generate(
            prompt, max_new_tokens=args.new_tokens, eos_token_id=[], streamer=lambda t: clock.tick()
        )
        plan = model.plan.to_json()
    return {
        **clock.record(),
        "new_ids": [int(t) for t in ids[len(prompt) :]],
        "loaded": loaded,
        "plan": {k: plan[k] for k in ("loaders", "window", "resident", "budget_bytes")},
    }


def llama_cpp(args, prompt: list[int]) -> dict[str, Any]:
    import llama_cpp
    import llama_cpp.llama_cpp as low

    if args.no_repack:  # keep the file's own layout: no load-time heap copy of the weights
        defaults = low.llama_model_default_params

        def no_extra_buffers():
            params = defaults()
            params.use_extra_bufts = False  # llama.cpp's --no-repack
            return params

        low.llama_model_default_params = no_extra_buffers
    llm = llama_cpp.Llama(
        model_path=str(args.weights),
        n_ctx=len(prompt) + args.new_tokens + 8,
        n_batch=len(prompt),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        use_mmap=True,
        verbose=False,
    )
    loaded = time.perf_counter()
    clock = _Clock()
    new: list[int] = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        clock.tick()
        new.append(int(token))
        if len(new) == args.new_tokens:
            break
    version = getattr(llama_cpp, "__version__", "?")
    return {**clock.record(), "new_ids": new, "loaded": loaded, "version": version}


def onnxruntime_genai(args, prompt: list[int]) -> dict[str, Any]:
    import onnxruntime_genai as og

    config = og.Config(str(args.weights))
    model = og.Model(config)
    loaded = time.perf_counter()
    params = og.GeneratorParams(model)
    total = len(prompt) + args.new_tokens
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    clock = _Clock()
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    new: list[int] = []
    while len(new) < args.new_tokens:
        generator.generate_next_token()
        new.append(int(generator.get_next_tokens()[0]))
        clock.tick()
    return {**clock.record(), "new_ids": new, "loaded": loaded, "version": og.__version__}


class _Streamer:
    """transformers' streamer protocol: put() the prompt first, then each new token."""

    def __init__(self, clock: _Clock) -> None:
        self.clock, self.prompt_seen, self.ids = clock, False, []

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.clock.tick()
        self.ids.extend(int(v) for v in value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def _hf_generate(model, prompt: list[int], new_tokens: int) -> tuple[_Clock, list[int]]:
    import torch

    ids = torch.tensor([prompt])
    clock = _Clock()
    streamer = _Streamer(clock)
    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            streamer=streamer,
        )
    return clock, streamer.ids


def transformers(args, prompt: list[int]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.weights, dtype=torch.float32).eval()
    loaded = time.perf_counter()
    clock, new = _hf_generate(model, prompt, args.new_tokens)
    return {**clock.record(), "new_ids": new, "loaded": loaded}


def _layers_on_disk(weights: Path) -> dict[str, str]:
    """accelerate's device map with the transformer layers on disk and the rest (embeddings,
    norm, head) in memory: transformers refuses to put everything on disk."""
    from accelerate import init_empty_weights
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(weights))
    lists = [(n, m) for n, m in empty.named_modules() if isinstance(m, nn.ModuleList)]
    stack = max(lists, key=lambda nm: len(nm[1]))[0]
    parent = stack.rsplit(".", 1)[0]
    device_map = {stack: "disk"}
    for name, _ in empty.named_children():
        if name != parent.split(".")[0]:
            device_map[name] = "cpu"
    for name, _ in empty.get_submodule(parent).named_children():
        full = f"{parent}.{name}"
        device_map.setdefault(full, "disk" if full == stack else "cpu")
    return device_map


def accelerate(args, prompt: list[int]) -> dict[str, Any]:
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="offload-", dir=args.scratch) as offload:
        model = AutoModelForCausalLM.from_pretrained(
            args.weights,
            dtype=torch.float32,
            device_map=_layers_on_disk(args.weights),
            offload_folder=offload,
        ).eval()
        loaded = time.perf_counter()
        clock, new = _hf_generate(model, prompt, args.new_tokens)
    return {**clock.record(), "new_ids": new, "loaded": loaded}


def airllm(args, prompt: list[int]) -> dict[str, Any]:
    import torch
    from airllm import AutoModel

    torch.set_num_threads(args.threads)
    model = AutoModel.from_pretrained(
        str(args.weights),
        device="cpu",
        dtype=torch.float32,
        layer_shards_saving_path=str(args.scratch),
        max_seq_len=len(prompt) + args.new_tokens + 8,
    )
    loaded = time.perf_counter()
    clock, new = _hf_generate(model, prompt, args.new_tokens)
    return {**clock.record(), "new_ids": new, "loaded": loaded}


# -- encoders --------------------------------------------------------------------------------------
def _checksums(outputs: dict) -> dict[str, list[float]]:
    """A few numbers per output, to compare engines without shipping the tensors."""
    import numpy as np

    out = {}
    for name, value in outputs.items():
        a = np.asarray(value, dtype=np.float64).reshape(-1)
        out[name] = [float(a.sum()), float(np.abs(a).max()), float(a[:8].sum())]
    return out


def _passes(run, passes: int) -> dict[str, Any]:
    times, outputs = [], None
    for _ in range(passes):
        t0 = time.perf_counter()
        outputs = run()
        times.append(time.perf_counter() - t0)
    return {"first_pass_s": times[0], "pass_s": times[1:], "checksums": _checksums(outputs)}


def hermes_ort_encoder(args, feeds: dict) -> dict[str, Any]:
    import hermes_ort

    model = hermes_ort.load(args.weights, memory_budget=args.budget, strategy=args.strategy)
    loaded = time.perf_counter()
    with model:
        record = _passes(lambda: model.run(feeds), args.passes)
    return {**record, "loaded": loaded, "budget_bytes": model.plan.budget_bytes}


def transformers_encoder(args, feeds: dict) -> dict[str, Any]:
    import torch
    from transformers import AutoModel

    torch.set_num_threads(args.threads)
    model = AutoModel.from_pretrained(args.weights, dtype=torch.float32).eval()
    loaded = time.perf_counter()
    tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}

    def run():
        with torch.no_grad():
            out = model(**tensors)
        return {k: out[k].numpy() for k in ("last_hidden_state", "pooler_output") if k in out}

    return {**_passes(run, args.passes), "loaded": loaded}


def optimum_encoder(args, feeds: dict) -> dict[str, Any]:
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForFeatureExtraction

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    model = ORTModelForFeatureExtraction.from_pretrained(args.weights, session_options=options)
    loaded = time.perf_counter()

    def run():
        import numpy as np

        out = model(**feeds)  # numpy in, numpy out
        return {k: np.asarray(out[k]) for k in ("last_hidden_state", "pooler_output") if k in out}

    return {**_passes(run, args.passes), "loaded": loaded}


DECODERS = {
    "hermes-ort": hermes_ort,
    "llama.cpp": llama_cpp,
    "onnxruntime-genai": onnxruntime_genai,
    "transformers": transformers,
    "accelerate": accelerate,
    "airllm": airllm,
}
ENCODERS = {
    "hermes-ort": hermes_ort_encoder,
    "transformers": transformers_encoder,
    "optimum": optimum_encoder,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.peers.child", description=__doc__)
    p.add_argument("engine")
    p.add_argument("weights", type=Path, help="what the engine opens (a file or a directory)")
    p.add_argument("--reference", type=Path, required=True, help="the prompt / inputs (JSON)")
    p.add_argument("--kind", default="decoder", choices=("decoder", "encoder"))
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", default=None, help="hermes-ort's memory budget")
    p.add_argument("--strategy", default="pipeload", help="hermes-ort's strategy")
    p.add_argument("--no-repack", action="store_true", help="llama.cpp: use_extra_bufts=False")
    p.add_argument("--scratch", type=Path, default=None, help="where an engine may write")
    p.add_argument("--t0", type=float, default=None, help="time.time() at the parent's spawn")
    return p


def run(argv: list[str]) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    t0 = args.t0 or T_START
    reference = json.loads(args.reference.read_text())
    start = time.perf_counter()
    if args.kind == "decoder":
        record = DECODERS[args.engine](args, reference["prompt_ids"])
    else:
        import numpy as np

        feeds = {k: np.asarray(v, dtype=np.int64) for k, v in reference["inputs"].items()}
        record = ENCODERS[args.engine](args, feeds)
    done = time.perf_counter()
    loaded = record.pop("loaded")
    return {
        **record,
        "load_s": loaded - start,
        "one_shot_s": time.time() - t0,
        "total_s": done - start,
    }


if __name__ == "__main__":
    from hermes_ort.measure.fresh_process import child_main

    sys.exit(child_main(run))
