"""Zero-shot generation with a trained LM: ``videolm generate --workdir LM_DIR --task TASK ...``.

    generator = Generator.from_workdir("runs/lm")
    outs = generator.generate("i2v", [Inputs(caption="a red circle moves up", image=frame)],
                              sampling=SamplingConfig(temperature=1.0, top_k=64, guidance_scale=2.0, seed=3))
    outs[0].video, outs[0].audio                                  # uint8 [T, H, W, 3], float32 [S]

The LM's workdir names its token shards (``config.data.tokens_dir``), whose ``config.json`` names
the video and audio tokenizer runs and holds the text model: the generator loads all of them. A
prompt is built by the same task functions the LM trained on (``videolm/tasks.py``), from the
tokens of the given media; the target is decoded under its layout's constraints
(``videolm/sampling.py``), with classifier-free guidance against the task's caption-free (or a
negative prompt's) form. Continuations (``future``, ``av_continuation``) force the given context
into the target, as in training. Video outputs without generated sound get it from the
video-to-audio task (``add_audio``), so every mp4 has sound; ``seconds`` beyond one clip extends
a video by future prediction from its last second.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from videolm import checkpoint, media, sampling, tasks
from videolm import tokenize as tokenize_lib
from videolm.vocab import VocabLayout

# What each task needs from the user: (required inputs, optional inputs).
TASK_INPUTS = {
    "unconditional": ((), ()),
    "t2v": (("prompt",), ()),
    "t2i": (("prompt",), ()),
    "i2v": (("image",), ("prompt",)),
    "future": (("video",), ()),
    "inpaint": (("video",), ("prompt", "mask")),
    "outpaint": (("video",), ("prompt", "mask")),
    "stylize": (("video",), ("prompt", "image")),  # video: the structure (control) video
    "a2v": (("audio",), ()),
    "v2a": (("video",), ()),
    "av_continuation": (("video", "audio"), ()),
}
INPUT_FIELDS = {"prompt": "caption", "image": "image", "video": "video", "audio": "audio", "mask": "mask"}


@dataclasses.dataclass
class Inputs:
    """One prompt's media, already at the world's size (``Generator.conform`` makes them so).

    caption: text; image: uint8 [H, W, 3]; video: uint8 [T, H, W, 3] (for ``stylize`` the structure
    video); audio: float32 [S]; mask: bool [H, W], True where inpainting/outpainting fills.
    """

    caption: str | None = None
    image: np.ndarray | None = None
    video: np.ndarray | None = None
    audio: np.ndarray | None = None
    mask: np.ndarray | None = None


@dataclasses.dataclass
class Output:
    """One sample: ``video`` uint8 [T, H, W, 3] (an image task: one frame), ``audio`` float32 [S]
    or None, the generated target ids and the prompt ids."""

    task: str
    video: np.ndarray | None
    audio: np.ndarray | None
    target: np.ndarray
    prefix: np.ndarray

    @property
    def is_image(self) -> bool:
        return tasks.get_task(self.task).output == "image"


class InputError(ValueError):
    """A task's input is missing or malformed."""


def check_inputs(task: str, given: Sequence[str]) -> None:
    """Refuses a missing required input (naming it), and inputs the task does not read."""
    tasks.get_task(task)
    required, optional = TASK_INPUTS[task]
    missing = [name for name in required if name not in given]
    if missing:
        raise InputError(f"task {task!r} needs --{' --'.join(missing)} (inputs it reads: "
                         f"{', '.join(required + optional) or 'none'})")
    unused = [name for name in given if name not in required + optional]
    if unused:
        raise InputError(f"task {task!r} does not read --{' --'.join(unused)} (inputs it reads: "
                         f"{', '.join(required + optional) or 'none'})")


def _load_json_config(path: str, what: str) -> ml_collections.ConfigDict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: expected the config.json of {what}")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


class Generator:
    """A trained LM with its tokenizers: prompts -> samples for every task of the mixture."""

    def __init__(self, model, layout: VocabLayout, *, video_tokenizer, audio_tokenizer, text_tokenizer, world,
                 options: tasks.TaskOptions, masks: ml_collections.ConfigDict):
        self.model, self.layout, self.options, self.masks = model, layout, options, masks
        self.video_tokenizer, self.audio_tokenizer, self.text_tokenizer = video_tokenizer, audio_tokenizer, text_tokenizer
        self.world = world  # videolm.data.soundshapes.WorldConfig: frames, size, fps, sample rate
        self.video_shape = tuple(video_tokenizer.token_shape(world.num_frames, world.height, world.width))
        self.num_samples = int(round(world.num_frames / world.fps * world.sample_rate))
        self.audio_shape = (audio_tokenizer.num_levels, audio_tokenizer.num_frames(self.num_samples))

    @classmethod
    def from_workdir(cls, workdir: str) -> "Generator":
        """Loads the latest LM checkpoint in ``workdir`` and the tokenizers its token shards used."""
        from tokenizers.magvit.api import VideoTokenizer
        from tokenizers.soundstream.api import AudioTokenizer
        from videolm import lm_data, parallel, train
        from videolm.data.soundshapes import WorldConfig

        config = _load_json_config(os.path.join(workdir, "config.json"), f"an LM run (workdir {workdir})")
        if config.get("kind") != "lm":
            raise ValueError(f"{workdir}/config.json is a {config.get('kind')!r} run, expected an LM ('lm')")
        if config.data.dataset != "tokens":
            raise ValueError(f"the LM in {workdir} trained on {config.data.dataset!r} data; generation needs an LM "
                             "trained on token shards (data.dataset='tokens')")
        tokens_config = _load_json_config(os.path.join(config.data.tokens_dir, "config.json"),
                                          f"the token shards ({config.data.tokens_dir})")
        config.mesh = dict(data=1, fsdp=1, tensor=1)
        mesh, rules, layout, graphdef, abstract = train.setup(config, devices=jax.devices()[:1])
        ckpt = checkpoint.Checkpointer(workdir)
        if ckpt.latest_step() is None:
            raise checkpoint.CheckpointError(f"no LM checkpoint in {workdir}")
        with parallel.use_mesh(mesh, rules):
            state, _ = train.restore_state(ckpt, abstract, layout)
        ckpt.close()
        model = nnx.merge(graphdef, state).model
        world = WorldConfig(**tokens_config.data.world.to_dict())
        return cls(model, layout, video_tokenizer=VideoTokenizer.from_workdir(tokens_config.video_tokenizer_workdir),
                   audio_tokenizer=AudioTokenizer.from_workdir(tokens_config.audio_tokenizer_workdir),
                   text_tokenizer=tokenize_lib.load_text_tokenizer(config.data.tokens_dir), world=world,
                   options=lm_data.task_options(config), masks=tokens_config.masks)

    # ------------------------------------------------------------------ inputs

    def conform(self, *, caption=None, image=None, video=None, audio=None, mask=None, fps=None,
                sample_rate=None) -> Inputs:
        """Media of any size, rate and length -> ``Inputs`` at the world's size, fps and duration."""
        w = self.world
        if image is not None:
            image = np.asarray(image)
            if image.ndim != 3 or image.shape[-1] != 3:
                raise InputError(f"image: expected [H, W, 3], got shape {image.shape}")
            image = media.center_crop_resize(image[None], w.height, w.width)[0]
        if video is not None:
            video = np.asarray(video)
            if video.ndim != 4 or video.shape[-1] != 3:
                raise InputError(f"video: expected frames [T, H, W, 3], got shape {video.shape}")
            video = media.resample_frames(video, fps or w.fps, w.fps, w.num_frames)
            video = media.center_crop_resize(video, w.height, w.width)
        if audio is not None:
            audio = np.asarray(audio, np.float32)
            if audio.ndim != 1:
                raise InputError(f"audio: expected a mono waveform [S], got shape {audio.shape}")
            if sample_rate and sample_rate != w.sample_rate:
                audio = media.resample_audio(audio, sample_rate, w.sample_rate)
            audio = media.fit_length(audio, self.num_samples)
        if mask is not None:
            mask = np.asarray(mask)
            if mask.ndim == 3:
                mask = mask[..., :3].mean(-1)
            if mask.ndim != 2:
                raise InputError(f"mask: expected an image [H, W] or [H, W, C], got shape {np.shape(mask)}")
            white = (mask > (127 if mask.max() > 1 else 0.5)).astype(np.uint8) * 255
            mask = media.center_crop_resize(np.repeat(white[None, ..., None], 3, -1), w.height, w.width)[0, ..., 0] > 127
        return Inputs(caption=caption, image=image, video=video, audio=audio, mask=mask)

    def _example(self, task: str, inputs: Inputs) -> dict:
        """The tokenized example ``tasks.build`` reads (outputs not given are zeros: only the prefix is used)."""
        t, h, w = self.video_shape
        ex = {"text": np.asarray(self.text_tokenizer.encode(inputs.caption or "")[: self.options.max_text_len],
                                 np.int32),
              "video": np.zeros((t, h, w), np.int32), "image": np.zeros((1, h, w), np.int32),
              "audio": np.zeros(self.audio_shape, np.int32)}
        if inputs.video is not None:
            codes = self.video_tokenizer.encode(inputs.video)
            ex["control" if task == "stylize" else "video"] = codes
            if task in ("inpaint", "outpaint"):
                mask = inputs.mask if inputs.mask is not None else self.default_mask(task)
                ex[task] = self.video_tokenizer.encode(tokenize_lib.apply_mask(inputs.video, mask, self.masks.fill))
        if inputs.image is not None:
            ex["image"] = self.video_tokenizer.encode(inputs.image[None])
        if inputs.audio is not None:
            ex["audio"] = self.audio_tokenizer.encode(inputs.audio)
        return ex

    def default_mask(self, task: str) -> np.ndarray:
        """The region inpainting/outpainting fills in training (config.masks of the token shards)."""
        w = self.world
        if task == "inpaint":
            return tokenize_lib.inpaint_mask(w.height, w.width, self.masks.inpaint_fraction)
        return tokenize_lib.outpaint_mask(w.height, w.width, self.masks.outpaint_border)

    def context_frames(self, seconds: float = 1.0) -> int:
        """Latent frames of a continuation's context: about the clip's first ``seconds``."""
        return min(sampling.context_latent_frames(seconds, self.world.fps, self.video_tokenizer.time_factor),
                   self.video_shape[0] - 1)

    def prompt(self, task: str, inputs: Inputs, *, negative_prompt: str | None = None,
               context_seconds: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prefix ids, unconditional/negative prefix ids, forced target [-1 = sampled]) of one prompt."""
        given = [name for name, field in INPUT_FIELDS.items() if getattr(inputs, field) is not None]
        check_inputs(task, given)
        options = dataclasses.replace(self.options, context_frames=self.context_frames(context_seconds),
                                      stylize_first_frame_prob=1.0 if inputs.image is not None else 0.0)
        example = self._example(task, inputs)
        seq = tasks.build(task, example, self.layout, options=options)
        if negative_prompt is not None and tasks.get_task(task).has_text:
            negative = dict(example, text=np.asarray(self.text_tokenizer.encode(negative_prompt), np.int32))
            uncond = tasks.build(task, negative, self.layout, options=options).prefix
        else:
            uncond = tasks.build(task, example, self.layout, options=options,
                                 condition="no_text" if tasks.get_task(task).has_text else "none").prefix
        target = self.target_layout(task)
        forced = np.full(target.length, -1, np.int32)
        if task in ("future", "av_continuation"):
            k = options.context_frames
            audio_context = (tasks.audio_context(example["audio"], k, self.video_shape[0], self.video_tokenizer.time_factor)
                             if task == "av_continuation" else None)
            forced = target.forced(self.layout, video=example["video"][:k], audio=audio_context)
        return seq.prefix, np.asarray(uncond, np.int32), forced

    def target_layout(self, task: str) -> sampling.TargetLayout:
        return sampling.target_layout(task, video_shape=self.video_shape, audio_shape=self.audio_shape)

    # ------------------------------------------------------------------ sampling

    def generate(self, task: str, prompts: Sequence[Inputs], *, num_samples: int = 1,
                 sampling_config: sampling.SamplingConfig = sampling.SamplingConfig(),
                 negative_prompt: str | None = None, add_audio: bool = True, context_seconds: float = 1.0,
                 batch_size: int = 64) -> list[Output]:
        """Samples ``num_samples`` outputs per prompt (prompt-major order), decoded to media.

        Sample j of prompt i uses seed ``seed + i * num_samples + j`` (reproducible alone).
        ``add_audio`` gives video outputs without generated sound the video-to-audio task's audio
        (the given audio for audio-to-video).
        """
        if num_samples < 1:
            raise InputError(f"num_samples must be >= 1, got {num_samples}")
        built = [self.prompt(task, p, negative_prompt=negative_prompt, context_seconds=context_seconds)
                 for p in prompts]
        rows = [b for b in built for _ in range(num_samples)]
        base = sampling_config.seed if isinstance(sampling_config.seed, (int, np.integer)) else sampling_config.seed[0]
        seeds = [int(base) + i for i in range(len(rows))]
        target = self.target_layout(task)
        guided = sampling_config.guidance_scale != 1.0
        ids = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            chunk_seeds = seeds[start:start + batch_size]
            # Batches rounded up to a power of two (repeating the last prompt) and prompts to a
            # multiple of 16 tokens: calls of similar size share one compiled program.
            fill = min(batch_size, 1 << (len(chunk) - 1).bit_length()) - len(chunk)
            chunk, chunk_seeds = chunk + [chunk[-1]] * fill, chunk_seeds + [chunk_seeds[-1]] * fill
            cfg = dataclasses.replace(sampling_config, seed=tuple(chunk_seeds))
            out = sampling.generate(self.model, [r[0] for r in chunk], num_tokens=target.length, allowed=target,
                                    sampling=cfg, vocab=self.layout,
                                    uncond_prefixes=[r[1] for r in chunk] if guided else None,
                                    forced=np.stack([r[2] for r in chunk]), prefix_multiple=16)
            ids.append(out[:len(out) - fill])
        ids = np.concatenate(ids)
        outputs = []
        for row, (prefix, _, _) in zip(ids, rows):
            parts = target.split(self.layout, row)
            video = self.video_tokenizer.decode(parts["video"]) if "video" in parts else None
            audio = self.audio_tokenizer.decode(parts["audio"]) if "audio" in parts else None
            outputs.append(Output(task=task, video=video, audio=audio, target=row, prefix=prefix))
        # Media that came with the prompt complete the outputs: the video of video-to-audio, the
        # sound of audio-to-video.
        for i, out in enumerate(outputs):
            given = prompts[i // num_samples]
            if task == "v2a":
                out.video = given.video
            if task == "a2v":
                out.audio = given.audio
        if add_audio:
            self.add_sound(outputs, sampling_config, batch_size=batch_size)
        return outputs

    def add_sound(self, outputs: Sequence[Output], sampling_config: sampling.SamplingConfig, *,
                  batch_size: int = 64) -> None:
        """Gives the video outputs without sound the video-to-audio task's sound (in place, one batch)."""
        silent = [o for o in outputs if o.video is not None and o.audio is None and not o.is_image]
        if silent:
            sounds = self.generate("v2a", [Inputs(video=o.video) for o in silent], sampling_config=sampling_config,
                                   add_audio=False, batch_size=batch_size)
            for o, sound in zip(silent, sounds):
                o.audio = sound.audio

    def extend(self, video: np.ndarray, seconds: float, *, sampling_config: sampling.SamplingConfig,
               context_seconds: float = 1.0) -> np.ndarray:
        """A clip extended to ``seconds`` by predicting the future from its last second, repeatedly."""
        num_frames = int(round(seconds * self.world.fps))
        out = sampling.extend_video(self.model, self.video_tokenizer.encode(video), num_frames=num_frames,
                                    vocab=self.layout, encode=self.video_tokenizer.encode,
                                    decode=self.video_tokenizer.decode,
                                    context_latent_frames=self.context_frames(context_seconds),
                                    time_factor=self.video_tokenizer.time_factor, sampling=sampling_config,
                                    options=self.options)
        return out.frames


# ----------------------------------------------------------------------------------- command line


def write_output(out: Output, path_stem: str, world) -> str:
    """Writes a sample as ``stem.png`` (image) or ``stem.mp4`` (video, with its sound); returns the path."""
    if out.is_image:
        path = path_stem + ".png"
        media.write_png(path, out.video[0])
        return path
    path = path_stem + ".mp4"
    audio = out.audio
    if audio is not None:
        audio = media.fit_length(np.clip(audio, -1.0, 1.0), int(round(out.video.shape[0] / world.fps * world.sample_rate)))
    media.write_mp4(path, out.video, world.fps, audio=audio, sample_rate=world.sample_rate if audio is not None else None)
    return path


def _read_inputs(args, generator: Generator) -> Inputs:
    caption = args.prompt
    image = media.read_image(args.image) if args.image else None
    mask = media.read_image(args.mask) if args.mask else None
    video = audio = fps = rate = None
    if args.video:
        clip = media.read_video(args.video)
        video, fps = clip.video, clip.fps
        if args.task == "av_continuation" and not args.audio and clip.audio is not None:
            audio, rate = clip.audio, clip.sample_rate
    if args.audio:
        audio, rate = media.read_audio(args.audio)
    given = [name for name, value in (("prompt", caption), ("image", image), ("video", video), ("audio", audio),
                                      ("mask", mask)) if value is not None]
    if args.task == "av_continuation" and "video" in given and "audio" not in given:
        raise InputError(f"task 'av_continuation' needs sound: --audio, or a --video with an audio track "
                         f"({args.video} has none)")
    check_inputs(args.task, given)
    return generator.conform(caption=caption, image=image, video=video, audio=audio, mask=mask, fps=fps,
                             sample_rate=rate)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--workdir", required=True, help="the LM's training workdir")
    parser.add_argument("--task", required=True, help=f"one of: {', '.join(TASK_INPUTS)}")
    parser.add_argument("--prompt", help="caption (text-conditioned tasks)")
    parser.add_argument("--negative-prompt", help="caption of the guidance's negative branch")
    parser.add_argument("--image", help="image file (i2v; stylize's optional first frame)")
    parser.add_argument("--video", help="video file (future, inpaint, outpaint, v2a, av_continuation; "
                                        "stylize: the structure video)")
    parser.add_argument("--audio", help="audio file (a2v, av_continuation)")
    parser.add_argument("--mask", help="image, white where inpaint/outpaint fills (default: the trained mask)")
    parser.add_argument("--seconds", type=float, help="duration of a video output (longer: extended by future "
                                                      "prediction from its last second)")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--silent", action="store_true", help="no video-to-audio sound for video outputs")
    parser.add_argument("--out", default="generated", help="output directory")
    return parser


def run(args: argparse.Namespace) -> dict:
    output = tasks.get_task(args.task).output  # unknown task: the list of known ones
    if args.seconds is not None:
        if output not in ("video", "video_audio"):
            raise InputError(f"--seconds applies to video outputs; task {args.task!r} makes {output}")
        if not args.seconds > 0:
            raise InputError(f"--seconds must be positive, got {args.seconds}")
    if args.num_samples < 1:
        raise InputError(f"--num-samples must be >= 1, got {args.num_samples}")
    for name in ("image", "video", "audio", "mask"):
        path = getattr(args, name)
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"--{name} {path} does not exist")
    generator = Generator.from_workdir(args.workdir)
    inputs = _read_inputs(args, generator)
    config = sampling.SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                     guidance_scale=args.guidance, seed=args.seed)
    outputs = generator.generate(args.task, [inputs], num_samples=args.num_samples, sampling_config=config,
                                 negative_prompt=args.negative_prompt, add_audio=not args.silent)
    if args.seconds is not None:
        for i, out in enumerate(outputs):
            frames = int(round(args.seconds * generator.world.fps))
            if frames > out.video.shape[0]:
                out.video = generator.extend(out.video, args.seconds,
                                             sampling_config=dataclasses.replace(config, seed=args.seed + i))
                out.audio = None
                if not args.silent:
                    out.audio = _long_audio(generator, out.video, config)
            else:
                out.video = out.video[:frames]
    os.makedirs(args.out, exist_ok=True)
    paths = [write_output(out, os.path.join(args.out, f"{args.task}_{i:02d}"), generator.world)
             for i, out in enumerate(outputs)]
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "config_overrides")}
    settings.update(outputs=paths, video_tokens=list(generator.video_shape), audio_tokens=list(generator.audio_shape))
    tmp = os.path.join(args.out, "settings.json.tmp")
    with open(tmp, "w") as f:
        json.dump(settings, f, indent=2)
    os.replace(tmp, os.path.join(args.out, "settings.json"))
    print(json.dumps({"outputs": paths}))
    return settings


def _long_audio(generator: Generator, video: np.ndarray, config: sampling.SamplingConfig) -> np.ndarray:
    """Sound for a long video: video-to-audio on each clip-long window (one batch), concatenated."""
    n, world = generator.world.num_frames, generator.world
    windows, lengths = [], []
    for start in range(0, video.shape[0], n):
        window = video[start:start + n]
        lengths.append(int(round(window.shape[0] / world.fps * world.sample_rate)))
        windows.append(np.concatenate([window, np.repeat(window[-1:], n - window.shape[0], 0)]))
    sounds = generator.generate("v2a", [Inputs(video=w) for w in windows], sampling_config=config, add_audio=False)
    return np.concatenate([s.audio[:length] for s, length in zip(sounds, lengths)])
