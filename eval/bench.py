"""`anomaly-assistant bench`: speed and memory, all measured in one run on the same images.

1. Expert-only screening (no LLM): images/s at 256 px against 4 references, and the time split between
   feature extraction (EfficientNet-Lite0) and matching (memory-bank nearest neighbours, calibration).
2. Inspection latency with the expert ÷ without it: the same anomaly model, the same images and exactly the
   same number of generated tokens (min = max new tokens); "with" is a full `ChatSession.inspect` (vision
   tower + expert + reference map + anomaly tokens + generation), "without" is the same weights asked the same
   question through the plain backbone processor (no anomaly block, so the expert never runs). A third path, a
   session without references, isolates the expert itself from the reference screener's CNN.
3. Tokens/s of that generation and the process's peak resident memory (plus peak GPU memory on a GPU).
4. With `--default-model`: the embedded default model as a user meets it: first-ever setup (conversion of
   the base + assembly of the shipped parts into an empty cache; `--no-default-model-setup` skips it), loading
   from the cache, and full inspections (verdict + boxes + rationale at the default generation length, 4
   references) on the same images: median seconds, tokens, and how many answers parsed.

By default the model is the tiny Qwen2.5-VL built in code. `--real-widths` builds a randomly initialised model
at Qwen2.5-VL-3B widths (text 2048 × 36 layers, vision 1280 × 32 blocks, real vocabulary; no weights needed)
so the same ratios can be read at real size, on a GPU when one is present (bfloat16 there; `--llm-layers`
trims the depth where memory is short, and the JSON records what was built).
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from anomaly_assistant.commands.config import DEVICE_HELP, parse_config, resolve_device
from anomaly_assistant.commands.runtime import note, run_command

KEYS = ("screening_img_per_s", "screening_busy_over_idle", "matching_over_extraction", "expert_latency_ratio",
        "expert_latency_ratio_no_references", "tokens_per_s", "peak_rss_mb")
# One CPU-bound competitor (a pure-Python loop holds one core), as another job on a shared machine would.
COMPETITOR = "while True:\n    pass\n"


@dataclass
class BenchConfig:
    """`anomaly-assistant bench`: what to measure, on which images and which model."""

    out: str = field(metadata={"help": "result JSON path"})
    images: int = field(default=48, metadata={"help": "test images (SynthInspect, mixed normal/defective)"})
    repeats: int = field(default=3, metadata={
        "help": "timed screening passes over the images (median reported)"})
    image_size: int = field(default=256, metadata={"help": "image side in pixels"})
    references: int = field(default=4, metadata={"help": "reference normals"})
    new_tokens: int = field(default=32, metadata={"help": "generated tokens per inspection (forced exactly)"})
    inspections: int = field(default=8, metadata={"help": "images timed for the latency ratio (median)"})
    real_widths: bool = field(default=False, metadata={"help": "random model at Qwen2.5-VL-3B widths"})
    llm_layers: int | None = field(default=None, metadata={
        "help": "override the LLM depth (real widths: 36)"})
    feature_source: str = field(default="backbone", metadata={
        "help": "feature source of the model's expert", "choices": ["backbone", "efficientnet_lite0"]})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    default_model: bool = field(default=False, metadata={
        "help": "also time the embedded default model: setup, load, full inspections"})
    default_model_setup: bool = field(default=True, metadata={
        "help": "with --default-model: time the first-ever setup into an empty temporary cache"})
    expert_fit: bool = field(default=True, metadata={
        "help": "time `expert fit` on the references (its default settings and budget)"})
    category: str = field(default="woven", metadata={"help": "SynthInspect category of the images"})
    seed: int = field(default=0, metadata={"help": "image and weight seed"})


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def bench_images(cfg: BenchConfig) -> tuple[list[Any], list[Any]]:
    """(test images, reference normals) from SynthInspect, deterministic in the seed."""
    from PIL import Image

    from anomaly_assistant.data_builders.synth_inspect import render

    refs = [Image.fromarray(render(cfg.category, 10_000 + i, seed=cfg.seed, size=cfg.image_size,
                                   anomalous=False).image) for i in range(cfg.references)]
    tests = [Image.fromarray(render(cfg.category, i, seed=cfg.seed, size=cfg.image_size,
                                    anomalous=bool(i % 2)).image)
             for i in range(cfg.images)]
    return tests, refs


def bench_screening(tests: list[Any], refs: list[Any], repeats: int = 3) -> dict[str, Any]:
    """Expert-only screening throughput and its extraction / matching split (warm, references fitted once).

    The images are screened `repeats` times; the median pass is reported (single passes on a shared CPU vary
    by about ±30 %), with every pass kept in the JSON. Then the same passes run again beside one CPU-bound
    competing process: `screening_busy_over_idle` is busy ÷ idle throughput, measured in this one run.
    """
    from anomaly_assistant import AnomalyAssistant
    from anomaly_assistant.expert.reference import record_timings

    expert = AnomalyAssistant.expert_only(feature_source="efficientnet_lite0")
    t0 = time.perf_counter()
    screener = expert.reference_screener(refs)
    fit_s = time.perf_counter() - t0
    expert.screen(tests[:2], screener=screener)  # warm-up
    passes = []
    for _ in range(max(1, repeats)):
        with record_timings() as timings:
            t0 = time.perf_counter()
            findings = expert.screen(tests, screener=screener)
            total = time.perf_counter() - t0
        extract, match = timings["extract"], timings["match"]
        passes.append({"seconds": total, "extract_s": extract, "match_s": match,
                       "other_s": total - extract - match})
    mid = sorted(passes, key=lambda p: p["seconds"])[len(passes) // 2]
    busy = _busy_passes(lambda: expert.screen(tests, screener=screener), repeats)
    busy_mid = sorted(busy)[len(busy) // 2]
    return {
        "screening_img_per_s": len(tests) / mid["seconds"],
        "screening_busy_over_idle": mid["seconds"] / busy_mid,
        "matching_over_extraction": mid["match_s"] / mid["extract_s"] if mid["extract_s"] > 0 else None,
        "screening": {**mid, "images": len(tests), "passes": passes, "reference_fit_s": fit_s,
                      "busy_passes_s": busy, "busy_img_per_s": len(tests) / busy_mid,
                      "anomalous_verdicts": sum(f.is_anomalous for f in findings)},
    }


def _busy_passes(screen: Any, repeats: int) -> list[float]:
    """Seconds of `repeats` screening passes while one CPU-bound competitor process runs."""
    import subprocess

    competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR])
    try:
        time.sleep(0.5)  # let it take its core
        seconds = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            screen()
            seconds.append(time.perf_counter() - t0)
        return seconds
    finally:
        competitor.kill()
        competitor.wait()


def bench_expert_fit(refs: list[Any]) -> dict[str, Any]:
    """`expert fit` on the references with its default settings and budget: seconds and steps run."""
    from anomaly_assistant.train.expert_fit import FitConfig, fit_expert

    t0 = time.perf_counter()
    fitted = fit_expert(refs, FitConfig(progress=False))
    return {"k": len(refs), "seconds": time.perf_counter() - t0, "steps_run": fitted.info["steps_run"],
            "split_s": fitted.info["seconds"]}


QWEN25_VL_3B = {
    "text": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
             "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
             "max_position_embeddings": 128000,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                 "mrope_section": [16, 24, 24]}},
    "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
               "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": 2048,
               "fullatt_block_indexes": [7, 15, 23, 31]},
}


def build_model(cfg: BenchConfig, device: str) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(anomaly model, anomaly processor, plain processor, description), random weights, built in code."""
    import torch

    from anomaly_assistant import modeling, tiny
    from anomaly_assistant.backbones import qwen2_5_vl

    family = "qwen2_5_vl"
    torch.manual_seed(cfg.seed)
    if not cfg.real_widths:
        backbone, plain = tiny.build_tiny(family, seed=cfg.seed)
        model, processor = modeling.from_backbone(backbone, plain, feature_source=cfg.feature_source)
        dtype = torch.float32
    else:
        from transformers import Qwen2_5_VLConfig

        tokenizer = tiny.build_tokenizer(family)
        plain = qwen2_5_vl.build_processor(tokenizer, min_pixels=56 * 56, max_pixels=1024 * 1024)
        text = dict(QWEN25_VL_3B["text"], eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=True)
        if cfg.llm_layers:
            text["num_hidden_layers"] = cfg.llm_layers
        ids = tokenizer.convert_tokens_to_ids
        base = Qwen2_5_VLConfig(
            text_config=text, vision_config=dict(QWEN25_VL_3B["vision"]), tie_word_embeddings=True,
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        )
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model, processor = modeling.from_config(base, plain, cfg.feature_source, dtype=dtype, device=device)
    model = model.to(device).eval()
    text_cfg = model.config.text_config
    info = {
        "family": family, "real_widths": cfg.real_widths, "dtype": str(dtype).replace("torch.", ""),
        "parameters": sum(p.numel() for p in model.parameters()),
        "expert_parameters": sum(p.numel() for p in model.expert.parameters()),
        "text_hidden": text_cfg.hidden_size, "text_layers": text_cfg.num_hidden_layers,
        "vision_hidden": model.config.vision_config.hidden_size,
        "vision_depth": model.config.vision_config.depth,
        "feature_source": cfg.feature_source,
    }
    return model, processor, plain, info


def _timed(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def bench_inspection(cfg: BenchConfig, tests: list[Any], refs: list[Any], device: str) -> dict[str, Any]:
    """Inspection latency with the expert vs the same weights without it, same generated length."""
    import torch

    from anomaly_assistant import AnomalyAssistant
    from anomaly_assistant.prompts import INSPECTION_PROMPT

    model, processor, plain, info = build_model(cfg, device)
    assistant = AnomalyAssistant(model, processor, device=device)
    n = cfg.new_tokens
    gen = {"min_new_tokens": n, "max_new_tokens": n}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    images = tests[: max(1, cfg.inspections)]
    session = assistant.chat(references=refs)  # references fitted once per session, as in use
    # the expert alone: LTFM, selector and anomaly tokens, no reference map
    session_no_refs = assistant.chat()

    def inspect_in(sess, im):
        return lambda: sess.inspect(im, **gen)

    plain.tokenizer.padding_side = "left"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSPECTION_PROMPT}]}]
    prompt = plain.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    out_len: list[int] = []

    def without_expert(im):
        def run():
            batch = plain(images=[im], text=[prompt], return_tensors="pt").to(device)
            with torch.no_grad():
                seq = model.generate(**batch, do_sample=False, **gen)
            out_len.append(seq.shape[1] - batch["input_ids"].shape[1])
        return run

    inspect_in(session, images[0])()  # warm-up all paths
    inspect_in(session_no_refs, images[0])()
    without_expert(images[0])()
    out_len.clear()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t_with, t_no_refs, t_without = [], [], []
    for im in images:  # interleaved, so all paths see the same machine load
        t_with.append(_timed(inspect_in(session, im), sync))
        t_no_refs.append(_timed(inspect_in(session_no_refs, im), sync))
        t_without.append(_timed(without_expert(im), sync))
    if any(k != n for k in out_len):
        raise RuntimeError(f"generation length differs from {n}: {out_len}")
    med_with, med_without = statistics.median(t_with), statistics.median(t_without)
    med_no_refs = statistics.median(t_no_refs)
    out = {
        "expert_latency_ratio": med_with / med_without,
        "expert_latency_ratio_no_references": med_no_refs / med_without,
        "tokens_per_s": n / med_with,
        "inspection": {"with_expert_s": t_with, "without_expert_s": t_without, "median_with_s": med_with,
                       "expert_no_references_s": t_no_refs, "median_expert_no_references_s": med_no_refs,
                       "median_without_s": med_without, "new_tokens": n,
                       "tokens_per_s_without_expert": n / med_without, "model": info},
    }
    if device.startswith("cuda"):
        out["inspection"]["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def bench_default_model(cfg: BenchConfig, tests: list[Any], refs: list[Any]) -> dict[str, Any]:
    """The default model as a user meets it: setup once, load from the cache, full inspections."""
    import tempfile

    from anomaly_assistant import AnomalyAssistant, default_model

    out: dict[str, Any] = {}
    if cfg.default_model_setup:
        with tempfile.TemporaryDirectory(prefix="aa-bench-cache.") as tmp:
            t = time.perf_counter()
            default_model.model_dir(tmp)
            out["setup_s"] = time.perf_counter() - t
    default_model.model_dir()  # the user's cache, made here if needed (not timed: the setup above is)
    t = time.perf_counter()
    assistant = AnomalyAssistant.from_pretrained()
    out["load_s"] = time.perf_counter() - t
    session = assistant.chat(references=refs)
    session.inspect(tests[0])  # warm-up (lazy screener weights, allocator)
    times, tokens, parsed = [], [], 0
    for im in tests[:cfg.inspections]:
        t = time.perf_counter()
        finding = session.inspect(im)
        times.append(time.perf_counter() - t)
        tokens.append(len(assistant.processor.tokenizer(finding.raw_text)["input_ids"]))
        parsed += finding.source == "model" and finding.parse_error is None
    out.update(inspections=len(times), median_inspection_s=statistics.median(times),
               mean_new_tokens=statistics.mean(tokens), parsed=parsed,
               max_new_tokens=assistant.generation.max_new_tokens)
    return out


def run(cfg: BenchConfig) -> dict[str, Any]:
    """The whole benchmark on one set of images, so screening and inspection figures are comparable."""
    import torch

    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    tests, refs = bench_images(cfg)
    result: dict[str, Any] = {}
    note(f"timing expert-only screening of {len(tests)} images against {len(refs)} references ...")
    result.update(bench_screening(tests, refs, cfg.repeats))
    if cfg.expert_fit:
        note(f"timing `expert fit` on the {len(refs)} references ...")
        result["expert_fit"] = bench_expert_fit(refs)
    note(f"timing inspection on {device} with the expert, without references and without the expert ...")
    result.update(bench_inspection(cfg, tests, refs, device))
    if cfg.default_model:
        note("timing the embedded default model: setup, load, full inspections ...")
        result["default_model"] = bench_default_model(cfg, tests, refs)
    result["peak_rss_mb"] = peak_rss_mb()
    result["seconds"] = time.perf_counter() - t0
    result["config"] = asdict(cfg)
    result["machine"] = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                         "cpu": platform.processor() or platform.machine(),
                         "python": platform.python_version()}
    if device.startswith("cuda"):
        result["machine"]["gpu"] = torch.cuda.get_device_name()
    return {**{k: result.pop(k) for k in KEYS}, **result}


def write_report(result: dict[str, Any], out_json: Path) -> tuple[Path, Path]:
    """Markdown + HTML next to the JSON, so a benchmark can be read without parsing it."""
    from anomaly_assistant.eval import report as R

    rep = R.Report("Speed and memory benchmark", out_json)
    rep.heading("Summary")
    rep.table([{k: result[k] for k in KEYS}])
    m = result["inspection"]["model"]
    rep.text(f"Model: {m['family']} {'at Qwen2.5-VL-3B widths' if m['real_widths'] else 'tiny'} "
             f"({m['parameters'] / 1e6:.1f} M parameters, expert {m['expert_parameters'] / 1e6:.2f} M, "
             f"text {m['text_hidden']}×{m['text_layers']}, vision {m['vision_hidden']}×{m['vision_depth']}, "
             f"{m['dtype']}), device {result['machine']['device']}, {result['machine']['threads']} threads.")
    s = result["screening"]
    rep.heading("Expert-only screening")
    rep.table([{"images": s["images"], "seconds": s["seconds"], "img/s": result["screening_img_per_s"],
                "busy img/s": s["busy_img_per_s"], "busy ÷ idle": result["screening_busy_over_idle"],
                "extract_s": s["extract_s"], "match_s": s["match_s"], "other_s": s["other_s"]}])
    if "expert_fit" in result:
        f = result["expert_fit"]
        rep.text(f"`expert fit` on k = {f['k']} references: {f['seconds']:.1f} s ({f['steps_run']} steps).")
    i = result["inspection"]
    rep.heading("Inspection latency")
    rep.table([{"path": "with expert", "median_s": i["median_with_s"], "tokens/s": result["tokens_per_s"]},
               {"path": "expert, no references", "median_s": i["median_expert_no_references_s"],
                "tokens/s": i["new_tokens"] / i["median_expert_no_references_s"]},
               {"path": "without expert", "median_s": i["median_without_s"],
                "tokens/s": i["tokens_per_s_without_expert"]}])
    if "default_model" in result:
        d = result["default_model"]
        rep.heading("Embedded default model")
        rep.table([{"first setup s": d.get("setup_s"), "load s": d["load_s"],
                    "median inspection s": d["median_inspection_s"], "mean tokens": d["mean_new_tokens"],
                    "parsed": f"{d['parsed']}/{d['inspections']}"}])
    rep.heading("Figures")
    rep.figure(R.plot_bars({"screening": {"extract_s": s["extract_s"], "match_s": s["match_s"],
                                          "other_s": s["other_s"]},
                            "inspection": {"with expert": i["median_with_s"],
                                           "without expert": i["median_without_s"]}},
                           ["extract_s", "match_s", "other_s", "with expert", "without expert"],
                           rep.figure_path("times.png"), title="seconds", ylim=None),
               "Screening time split (all images) and median inspection latency per image")
    return rep.save()


def main(argv: list[str] | None = None, command: str = "bench") -> int:
    """`anomaly-assistant bench ...`: JSON + report to --out; usage errors print one line and return 2."""
    from anomaly_assistant.eval import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    prog = f"anomaly-assistant {command}"

    def body() -> int:
        cfg = parse_config(BenchConfig, argv, prog, __doc__.splitlines()[0])
        result = run(cfg)
        out = Path(cfg.out)
        md, html = write_report(result, out)
        result["report"] = {"markdown": md.name, "html": html.name}
        cli.write_json(result, out)
        summary = {k: result[k] for k in KEYS}
        if "default_model" in result:
            d = result["default_model"]
            summary |= {"default_setup_s": d.get("setup_s"), "default_load_s": d["load_s"],
                        "default_inspection_s": d["median_inspection_s"]}
        print(json.dumps(summary))
        note(f"wrote {out}, {md}, {html}")
        return 0

    return run_command(prog, argv, body)


if __name__ == "__main__":
    sys.exit(main())
