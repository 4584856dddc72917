"""Our Pipeline against diffusers' StableDiffusionPipeline on identical weights and settings.

Both pipelines share the same UNet, VAE and text encoder instances, so only the pipelines' own code
differs. Runs alternate in one process after warm-up, who goes first swapping every round; each figure is
a median. Reported: end to end, text encoding (each pipeline's own prompt code), UNet time per guided step
and VAE decode (the shared modules: their ratios show the measurement's noise), the ratio ours / diffusers,
the median of the per-round end-to-end ratios, and the denoising loop alone (given prompt embeddings, latents
out: UNet, guidance and scheduler; its it/s is what a progress bar shows). The ratios are printed last, one
`ratio_<what>_<preset>: X` line each, so a script can read them.

    python benchmarks/bench_pipeline.py --preset tiny --repeats 10
    python benchmarks/bench_pipeline.py --preset sd15 --device cuda --dtype bfloat16 --steps 50 \
        --compile-mode reduce-overhead --channels-last --fuse-qkv                       # on a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["tiny", "small"], help="model presets to compare")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=10, help="timed runs of each pipeline (alternating)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--batch", type=int, default=1, help="images per prompt")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the (shared) UNet: pipe.compile()")
    p.add_argument("--compile-mode", default=None, help='torch.compile mode, e.g. "max-autotune" (tuned kernels '
                   'and CUDA graphs) or "reduce-overhead" (CUDA graphs); implies --compile')
    p.add_argument("--channels-last", action="store_true", help="NHWC memory layout for the UNet")
    p.add_argument("--fuse-qkv", action="store_true", help="fused attention projections (diffusers')")
    p.add_argument("--tune-inductor", action="store_true",
                   help="Inductor settings from diffusers' and PyTorch's SD speed-up guides: 1x1 convolutions as "
                        "matrix products, coordinate-descent kernel tuning, no epilogue fusion (slower compile)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.compile = args.compile or args.compile_mode is not None
    return args


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def load_pair(preset: str, folder: str, device: str, dtype: torch.dtype, compile_unet: bool, **compile_options):
    """Returns (ours, diffusers') pipelines over the same module instances (UNet, VAE, text encoder), loaded by
    ours from a saved folder: only the pipelines' own code differs. Loaded separately, the two pipelines' UNets
    ran measurably apart, and the gap followed the instance (swapping the UNets swapped it): that measured where
    each load put its weights, not the pipelines (benchmarks/BENCHMARKS.md, Sampling)."""
    from diffusers import StableDiffusionPipeline

    from ldm import Pipeline
    from ldm.models.presets import build_components

    Pipeline(**build_components(preset, seed=0)).save_pretrained(folder)
    ours = Pipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
    theirs = StableDiffusionPipeline(vae=ours.vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer,
                                     unet=ours.unet, scheduler=type(ours.scheduler).from_config(ours.scheduler.config),
                                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if compile_unet:  # in place, so diffusers' pipeline holds the same compiled module
        ours.compile(**compile_options)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def component_times(pipe, args, height: int, width: int) -> dict:
    """Returns seconds for text encoding, one guided UNet call and one VAE decode, on this pipeline's modules.

    The UNet is called as both pipelines call it (no_grad, return_dict=False): a compiled UNet would compile
    and capture CUDA graphs again for inference_mode or a different output type."""
    device, prompt = args.device, ["a red circle on the left"]
    encode = (lambda: pipe.encode_prompt(prompt, None, args.batch, True, device=device)) if hasattr(pipe, "_tokenize") else \
        (lambda: pipe.encode_prompt(prompt, device, args.batch, True))
    cond, uncond = encode()
    context = torch.cat([uncond, cond])  # (2B, 77, D)
    f = pipe.vae_scale_factor
    x = torch.randn(2 * args.batch, pipe.unet.config.in_channels, height // f, width // f, device=device,
                    dtype=context.dtype)
    with torch.no_grad():
        unet = lambda: pipe.unet(x, torch.tensor(500, device=device), encoder_hidden_states=context,  # noqa: E731
                                 return_dict=False)
        decode = lambda: pipe.vae.decode(x[: args.batch] / pipe.vae.config.scaling_factor)  # noqa: E731
        return {"text_encoding": timed(encode, device), "unet_step": timed(unet, device),
                "vae_decode": timed(decode, device)}


class ModuleClock:
    """Seconds spent inside the shared modules' forward passes (UNet, text encoder, VAE decoder), via hooks.

    End to end minus this is each pipeline's own cost (its loop, scheduler calls, prompt and image handling):
    the part the two pipelines do not share. Meaningful only where calls run synchronously (CPU, eager).
    """

    def __init__(self, modules):
        self.seconds, self._start = 0.0, {}
        for m in modules:
            m.register_forward_pre_hook(lambda mod, _: self._start.__setitem__(id(mod), time.perf_counter()))
            m.register_forward_hook(lambda mod, _, __: self._add(time.perf_counter() - self._start.pop(id(mod))))

    def _add(self, seconds: float) -> None:
        self.seconds += seconds


def compile_options(args) -> dict:
    """pipe.compile() keyword arguments from the command line."""
    options = dict(channels_last=args.channels_last, fuse_qkv=args.fuse_qkv)
    if args.compile_mode:
        options["mode"] = args.compile_mode
    if args.tune_inductor:
        import torch._inductor.config as inductor

        inductor.conv_1x1_as_mm = True
        inductor.coordinate_descent_tuning = True
        inductor.coordinate_descent_check_all_directions = True
        inductor.epilogue_fusion = False
    return options


def bench_preset(preset: str, args, options: dict) -> dict:
    from ldm.models.presets import get_spec

    dtype = getattr(torch, args.dtype)
    spec = get_spec(preset)
    height = width = spec.resolution
    with tempfile.TemporaryDirectory() as folder:
        pipes = dict(zip(("ours", "diffusers"), load_pair(preset, folder, args.device, dtype, args.compile,
                                                          **options)))
        if not args.compile and (args.channels_last or args.fuse_qkv):
            raise SystemExit("--channels-last and --fuse-qkv apply with --compile or --compile-mode")
        prompt = "a red circle on the left"
        call = dict(num_inference_steps=args.steps, height=height, width=width, guidance_scale=args.guidance_scale,
                    num_images_per_prompt=args.batch)
        cond, uncond = pipes["ours"].encode_prompt([prompt], None, 1, True, device=args.device)
        run = {name: (lambda p=p: p(prompt=prompt, **call, output_type="np", generator=torch.Generator().manual_seed(0)))
               for name, p in pipes.items()}
        # the denoising loop alone: given embeddings, latents out (no text encoder, no VAE)
        loop = {name: (lambda p=p: p(prompt_embeds=cond, negative_prompt_embeds=uncond, **call, output_type="latent",
                                     generator=torch.Generator().manual_seed(0))) for name, p in pipes.items()}
        times = {name: {"end_to_end": [], "denoise_loop": [], "text_encoding": [], "unet_step": [], "vae_decode": []}
                 for name in pipes}
        shared = pipes["ours"]
        clock = None if args.compile or args.device != "cpu" else \
            ModuleClock([shared.unet, shared.text_encoder, shared.vae.post_quant_conv, shared.vae.decoder])
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        for i in range(args.warmup + args.repeats):
            # alternate, and swap who goes first every round (ABBA), so drifts in machine load hit both alike
            for name in (list(pipes) if i % 2 == 0 else list(pipes)[::-1]):
                if clock:
                    clock.seconds = 0.0
                end_to_end = timed(run[name], args.device)
                inside = clock.seconds if clock else None
                denoise_loop = timed(loop[name], args.device)
                parts = component_times(pipes[name], args, height, width)
                if i >= args.warmup:
                    times[name]["end_to_end"].append(end_to_end)
                    times[name]["denoise_loop"].append(denoise_loop)
                    if clock:
                        times[name].setdefault("pipeline_own", []).append(end_to_end - inside)
                    for k, v in parts.items():
                        times[name][k].append(v)
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    medians = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    ratios = {k: medians["ours"][k] / medians["diffusers"][k] for k in medians["ours"]}
    # Each round's two end-to-end runs are adjacent in time: the median of their per-round ratios cancels the
    # machine's slow drifts in speed (benchmarks/BENCHMARKS.md, Sampling) that the ratio of medians keeps.
    paired = statistics.median(a / b for a, b in zip(times["ours"]["end_to_end"], times["diffusers"]["end_to_end"]))
    return {"preset": preset, "resolution": height, "medians_s": medians, "ratios": ratios, "paired_end_to_end": paired,
            "unet_it_s": 1 / medians["ours"]["unet_step"],
            "loop_it_s": {name: args.steps / m["denoise_loop"] for name, m in medians.items()}, "peak_gib": peak}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    options = compile_options(args) if args.compile else {}
    results = []
    for preset in args.preset:
        result = bench_preset(preset, args, options)
        results.append(result)
        print(f"\n== {preset} @ {result['resolution']} px, {args.steps} steps, guidance {args.guidance_scale}, "
              f"batch {args.batch}, {args.device} {args.dtype}{' compiled ' + str(options) if args.compile else ''}, "
              f"median of {args.repeats} alternating runs")
        print(f"{'':14s}{'ours (s)':>12s}{'diffusers (s)':>15s}{'ratio':>8s}")
        for k in result["ratios"]:
            print(f"{k:14s}{result['medians_s']['ours'][k]:12.4f}{result['medians_s']['diffusers'][k]:15.4f}"
                  f"{result['ratios'][k]:8.3f}")
        print(f"median of the per-round end-to-end ratios: {result['paired_end_to_end']:.3f}")
        print(f"one guided UNet call (batch {2 * args.batch}): {result['unet_it_s']:.1f} it/s; denoising loop "
              f"(UNet, guidance, scheduler): ours {result['loop_it_s']['ours']:.1f} it/s, diffusers "
              f"{result['loop_it_s']['diffusers']:.1f} it/s")
        if result["peak_gib"] is not None:
            print(f"peak GPU memory allocated: {result['peak_gib']:.2f} GiB")
    if args.json:
        meta = {"machine": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d"), "args": vars(args)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    print()
    for r in results:  # last lines: machine-readable ratios
        print(f"ratio_end_to_end_{r['preset']}: {r['ratios']['end_to_end']:.3f}")
        print(f"ratio_end_to_end_paired_{r['preset']}: {r['paired_end_to_end']:.3f}")
        if "pipeline_own" in r["ratios"]:
            print(f"ratio_pipeline_own_{r['preset']}: {r['ratios']['pipeline_own']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
