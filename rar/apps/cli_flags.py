"""The sampling and refinement flags that every generating command of `rar` shares, and their
conversion to the library's settings objects (flag names match the keyword names). Imported by
`rar.apps.cli`; like it, it imports the library only inside the functions that run (start-up time)."""
from __future__ import annotations


def add_sampling_flags(p) -> None:
    """The sampling settings every generating command takes (unset: the generator's defaults)."""
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--guidance-scale-pow", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--steps", type=int, default=None,
                   help="network passes (parallel decoding: several tokens per pass); default one per token")
    p.add_argument("--schedule", default=None,
                   help="group sizes over the passes: cosine (default), arccos, linear or constant")


def add_refine_flags(p) -> None:
    p.add_argument("--refine-rounds", type=int, default=0,
                   help="after sampling, resample a fraction of each image's tokens given all the others this many times")
    p.add_argument("--refine-fraction", type=float, default=None,
                   help="share of the tokens resampled per round (default 0.1)")
    p.add_argument("--refine-select", default=None, choices=["likelihood", "random"],
                   help="which tokens: the least likely given their context, or random ones")


def refine_settings(args):
    from ..inference.refinement import RefineSettings

    given = [f for f, v in (("--refine-fraction", args.refine_fraction), ("--refine-select", args.refine_select))
             if v is not None]
    if given and not args.refine_rounds:
        raise ValueError(f"{given[0]} has no effect without --refine-rounds N (N >= 1 rounds of refinement).")
    return RefineSettings(args.refine_rounds, 0.1 if args.refine_fraction is None else args.refine_fraction,
                          args.refine_select or "likelihood")


def sampling_settings(args):
    """The sampling flags as a `SamplingSettings` (unset flags stay None: the preset's values)."""
    from ..inference.sampler import SamplingSettings

    if args.schedule is not None and args.steps is None:
        raise ValueError("--schedule sets the group sizes of parallel decoding; give --steps S (fewer passes than "
                         "tokens) with it.")
    return SamplingSettings(args.guidance_scale, args.guidance_scale_pow, args.temperature, args.top_k, args.top_p,
                            steps=args.steps, schedule=args.schedule)
