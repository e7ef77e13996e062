"""Zero-shot chaining: the output of one task is the prompt of the next.

    python experiments/chain.py --workdir demo_out/lm --prompt "a red circle moves up" --out chain_out

1. text-to-image: the caption -> a first frame;
2. image-to-video: that frame (and the caption) -> a clip;
3. stylization: the clip's structure (objects as grey silhouettes, as the SoundShapes control
   videos are drawn) and a new caption -> the same motion in other colours;
4. video-to-audio: the stylized clip -> its sound;
5. long video: the image-to-video clip extended to ``--seconds`` by predicting the future from its
   last second, repeatedly.

Every step is written as png/mp4 and scored by the SoundShapes evaluator against what the captions
say; ``chain.json`` holds the settings and the scores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from videolm import media, sampling
from videolm.data import soundshapes
from videolm.eval import metrics
from videolm.eval import world as world_eval
from videolm.generate import Generator, Inputs, Output, write_output


def structure_video(video: np.ndarray, world: soundshapes.WorldConfig) -> np.ndarray:
    """A SoundShapes-style control video of a clip: its objects (found by the evaluator) as flat
    grey silhouettes on black, no colour."""
    analysis = world_eval.analyze_video(video, world)
    out = np.zeros_like(video)
    out[analysis.object_mask] = 160
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="the LM's workdir (e.g. demo_out/lm)")
    parser.add_argument("--prompt", default="a red circle moves up")
    parser.add_argument("--style-prompt", default=None, help="caption of the stylized clip (default: the "
                                                             "prompt with its colour changed)")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="chain_out")
    args = parser.parse_args(argv)

    generator = Generator.from_workdir(args.workdir)
    world = generator.world
    cfg = sampling.SamplingConfig(guidance_scale=args.guidance, seed=args.seed)
    objects = soundshapes.parse_caption(args.prompt)
    # the same shapes and motions in other colours
    style = args.style_prompt or soundshapes.caption_for(
        [("blue" if color != "blue" else "green", shape, motion) for color, shape, motion in objects])
    os.makedirs(args.out, exist_ok=True)

    image = generator.generate("t2i", [Inputs(caption=args.prompt)], sampling_config=cfg)[0]
    clip = generator.generate("i2v", [Inputs(caption=args.prompt, image=image.video[0])], sampling_config=cfg)[0]
    control = structure_video(clip.video, world)
    styled = generator.generate("stylize", [Inputs(caption=style, video=control)], sampling_config=cfg,
                                add_audio=False)[0]
    styled.audio = generator.generate("v2a", [Inputs(video=styled.video)], sampling_config=cfg)[0].audio
    long = generator.extend(clip.video, args.seconds, sampling_config=cfg)

    paths = {
        "t2i": write_output(image, os.path.join(args.out, "1_t2i"), world),
        "i2v": write_output(clip, os.path.join(args.out, "2_i2v"), world),
        "structure": write_output(Output("future", control, None, np.zeros(0), np.zeros(0)),
                                  os.path.join(args.out, "3_structure"), world),
        "stylize+v2a": write_output(styled, os.path.join(args.out, "4_stylize_v2a"), world),
        "long": write_output(Output("future", long, None, np.zeros(0), np.zeros(0)),
                             os.path.join(args.out, "5_long"), world),
    }
    media.write_png_grid(os.path.join(args.out, "frames.png"), np.concatenate([clip.video, styled.video]),
                         columns=clip.video.shape[0])

    def caption_score(video, caption):
        scores = metrics.score_clips(world, videos=[video], captions=[caption])
        return scores["caption"]

    report = {
        "prompt": args.prompt, "style_prompt": style, "seconds": args.seconds, "guidance": args.guidance,
        "seed": args.seed, "outputs": paths,
        "scores": {"i2v vs prompt": caption_score(clip.video, args.prompt),
                   "stylize vs style prompt": caption_score(styled.video, style),
                   "long video frames": int(long.shape[0])},
    }
    with open(os.path.join(args.out, "chain.json"), "w") as f:
        json.dump(report, f, indent=2, default=float)
    print(json.dumps(report, default=float))
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
