"""The ``videolm`` command.

    videolm data build --dataset soundshapes --data-dir DIR
    videolm train --config configs/X.py[:arg] --workdir DIR [--config.a.b=v ...]
    videolm eval  --config configs/X.py[:arg] --workdir DIR
    videolm bench NAME [--config configs/X.py[:arg]]
    videolm demo  --out DIR

``train`` and ``eval`` dispatch on ``config.kind``; each kind's implementation is imported only
when used, so ``videolm --help`` stays fast and one missing optional dependency affects only the
command that needs it.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Callable

from videolm import configlib

# config.kind -> "module:function"; functions take (config, workdir).
TRAINERS: dict[str, str] = {
    "tokenizer_video": "tokenizers.magvit.train:train",
    "audio_tokenizer": "tokenizers.soundstream.train:train",
    "lm": "videolm.train:train",
}
EVALUATORS: dict[str, str] = {
    "soundshapes": "videolm.cli:evaluate_world",
    "tokenizer_video": "tokenizers.magvit.evaluate:evaluate",
    "audio_tokenizer": "tokenizers.soundstream.evaluate:evaluate",
    "lm": "videolm.train:evaluate",
}
# benchmark name -> "module:function"; functions take (config or None) and return a dict.
BENCHMARKS: dict[str, str] = {
    "soundshapes": "videolm.cli:bench_soundshapes",
    "attention": "videolm.kernels.attention.bench:run_bench",
    "tokenizer": "tokenizers.magvit.bench:bench",
    "audio_tokenizer": "tokenizers.soundstream.bench:bench",
    "lm": "videolm.lm_bench:bench",
    "decode": "videolm.decode_bench:bench",
}


class UsageError(ValueError):
    """Bad command-line input; reported as one line without a traceback."""


def _resolve(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _load(args) -> "ml_collections.ConfigDict":  # noqa: F821
    if not args.config:
        raise UsageError("--config is required (for example --config configs/lm.py:tiny)")
    return configlib.load_config(args.config, args.config_overrides)


def _kind(config, table: dict[str, str], what: str) -> str:
    kind = config.get("kind")
    if kind not in table:
        known = ", ".join(sorted(table)) or "none"
        raise UsageError(f"config kind {kind!r} has no {what}; known kinds: {known}")
    return table[kind]


def cmd_train(args) -> int:
    config = _load(args)
    os.makedirs(args.workdir, exist_ok=True)
    _resolve(_kind(config, TRAINERS, "trainer"))(config, args.workdir)
    return 0


def cmd_tokenize(args) -> int:
    config = _load(args)
    if config.get("kind") != "tokenize":
        raise UsageError(f"videolm tokenize needs a tokenize config (kind 'tokenize'), got kind {config.get('kind')!r}")
    from videolm import tokenize
    summary = tokenize.run(config, args.workdir)
    print(json.dumps(summary["splits"], sort_keys=True))
    return 0


def cmd_eval(args) -> int:
    config = _load(args)
    result = _resolve(_kind(config, EVALUATORS, "evaluator"))(config, args.workdir)
    configlib.write_json(os.path.join(args.workdir, "eval.json"), result)
    print(json.dumps(result, sort_keys=True))
    return 0


def cmd_bench(args) -> int:
    if args.name not in BENCHMARKS:
        raise UsageError(f"unknown benchmark {args.name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    config = configlib.load_config(args.config, args.config_overrides) if args.config else None
    results = _resolve(BENCHMARKS[args.name])(config)
    from videolm import benchmark
    for row in results if isinstance(results, list) else [results]:
        benchmark.emit(row)
    return 0


def evaluate_world(config, workdir: str) -> dict:
    """``kind = 'soundshapes'``: the evaluator's scores of ground-truth clips (configs/soundshapes.py)."""
    from videolm.data.soundshapes import WorldConfig
    from videolm.eval.evaluate_world import evaluate_ground_truth
    world = WorldConfig(**config.world.to_dict())
    return evaluate_ground_truth(world, config.eval.split, num_clips=config.eval.num_clips,
                                 seed=config.eval.seed, through_mp4=config.eval.through_mp4)


def bench_soundshapes(config) -> list[dict]:
    """Clips generated per second at 64x64 and 128x128 (``videolm bench soundshapes``)."""
    from videolm.data.soundshapes import WorldConfig, measure_throughput
    return [measure_throughput(WorldConfig(height=s, width=s), 200) for s in (64, 128)]


def cmd_data_build(args) -> int:
    from videolm.data import build
    build.run(args)
    return 0


def cmd_generate(args) -> int:
    from videolm import generate
    generate.run(args)
    return 0


def cmd_demo(args) -> int:
    from videolm import demo
    demo.run(args)
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="videolm", description="VideoPoet in JAX: tokenizers, LM, generation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p, required_workdir=True):
        p.add_argument("--config", help="configs/X.py[:arg]; override fields with --config.a.b=value")
        p.add_argument("--workdir", required=required_workdir, help="run directory (checkpoints, logs)")

    p = sub.add_parser("train", help="train what the config describes; resumes from --workdir")
    with_config(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="score a trained model; prints one JSON object, writes workdir/eval.json")
    with_config(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("tokenize", help="token shards of a dataset through the trained tokenizers; resumes")
    with_config(p)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("bench", help="a benchmark; prints one JSON line per result, last")
    p.add_argument("name", help="benchmark name")
    p.add_argument("--config", help="configs/X.py[:arg]")
    p.set_defaults(func=cmd_bench)

    # These commands' options come from heavier modules: imported only when the command is used.
    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data.add_parser("build", help="build a TFDS dataset (array_record)")
    if command == "data":
        from videolm.data import build
        build.add_arguments(p)
    p.set_defaults(func=cmd_data_build)

    p = sub.add_parser("generate", help="prompt a trained LM for any task; writes mp4/png and settings.json")
    if command == "generate":
        from videolm import generate
        generate.add_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="the whole pipeline on SoundShapes with tiny configs")
    if command == "demo":
        from videolm import demo
        demo.add_arguments(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    try:
        argv, overrides = configlib.split_config_overrides(argv)
    except configlib.ConfigError as e:
        parser.error(str(e))
    args = parser.parse_args(argv)
    args.config_overrides = overrides
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, FloatingPointError, RuntimeError) as e:
        # Bad input (config values, files, shapes) and failed runs: one line naming the problem.
        # VIDEOLM_DEBUG=1 shows the traceback instead.
        if os.environ.get("VIDEOLM_DEBUG"):
            raise
        print(f"videolm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
