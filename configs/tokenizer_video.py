"""MAGVIT-v2 video tokenizer (causal 3D CNN + LFQ) trained on SoundShapes.

    videolm train --config configs/tokenizer_video.py:tiny --workdir DIR
    videolm eval  --config configs/tokenizer_video.py:tiny --workdir DIR
    videolm bench tokenizer --config configs/tokenizer_video.py:bench

Variants (the argument after the colon):
  tiny         64x64, 17 frames -> 5x16x16 tokens, 2^10 codes; trains on a laptop CPU in 15 minutes:
               its image stage first (400 s, in WORKDIR/image_stage), inflated, then 420 s of video.
  tiny_image   the 2D image stage of ``tiny`` (1-frame videos, 1-frame temporal kernels) as a run
               of its own: pass its workdir as ``init.image_workdir`` of ``tiny`` to inflate it.
  paper        VideoPoet's tokenizer: 17x128x128 -> 5x16x16, 128 x (1,2,2,4), 4 residual blocks,
               2^18 codes, discriminator (2,4,4,4,4).
  paper_image  the 2D image stage of ``paper``.
  demo         the end-to-end demo's tokenizer (``videolm demo``): 64x64, 17 frames -> 5x8x8 tokens
               (8x spatial downsampling: few tokens for a CPU-trained LM), 2^10 codes; trains in
               under 4 minutes on a 2-core CPU (image stage first; no perceptual or GAN term, 32x32
               crops).
  bench        the speed benchmark's model (32 x (1,2,2,4), 2 residual blocks, 12 bits, batch 2 of
               17x64x64 clips): no perceptual or GAN term, so one step is encoder + LFQ + decoder.
"""
import ml_collections

VARIANTS = ("tiny", "tiny_image", "paper", "paper_image", "bench", "demo")


def get_config(arg=None):
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"tokenizer_video config: unknown variant {variant!r}; expected one of {VARIANTS}")
    image = variant.endswith("_image")
    base = variant.removesuffix("_image")

    config = ml_collections.ConfigDict()
    config.kind = "tokenizer_video"
    config.variant = variant
    config.seed = 0
    config.mesh = dict(data=-1, fsdp=1, tensor=1)
    # Batch over data x fsdp; with fsdp > 1 conv kernels are split along their output channels.
    config.logical_axis_rules = (
        ("batch", ("data", "fsdp")),
        ("conv_out", "fsdp"),
        ("conv_in", None),
        ("norm", None),
    )

    config.model = ml_collections.ConfigDict(dict(
        base_channels=16,
        channel_multipliers=(1, 2, 2),
        num_res_blocks=(0, 1, 2),           # per level (an int: every level); mid blocks use the last
        temporal_downsample=(True, True),   # one per downsampler: 17 -> 9 -> 5
        codebook_bits=10,
        # GroupNorm statistics are per frame: with one channel per group a norm erases every
        # per-frame constant (a plain background's grey level), so keep several channels per group.
        num_groups=4,
        temporal_kernel=3,
        conv_impl="fold_time",              # 'xla3d' | 'fold_time' | 'sum2d' (same math)
        dtype="float32",                    # compute dtype; 'bfloat16' on accelerators
    ))
    config.lfq = ml_collections.ConfigDict(dict(
        commitment_weight=0.25,
        entropy_weight=0.1,
        entropy_start_multiplier=3.0,       # x3 at step 0 ...
        entropy_anneal_steps=500,           # ... down to x1 here (paper: 2000)
        entropy_temperature=0.01,
        entropy_bits_per_group=9,           # sub-groups bound memory at 2^9 codes per group
        diversity_weight=1.0,
    ))
    config.loss = ml_collections.ConfigDict(dict(
        recon_weight=5.0,
        perceptual_weight=0.1,
        perceptual_frames=1,                # frames per clip scored by LPIPS-VGG (0: all)
        # On this CPU a step with LPIPS-VGG costs 4x the tokenizer's own step and one with the
        # discriminator 8x: the 15-minute tiny schedule spends its steps on reconstruction, and
        # both terms join only in longer runs (--config.train.num_steps beyond these).
        perceptual_start_step=3000,
        gan_weight=0.1,
        gan_start_step=3000,
        r1_weight=10.0,
        r1_every=4,                         # lazy R1: every 4th discriminator step, x4
        lecam_weight=0.001,
        lecam_decay=0.999,
    ))
    config.discriminator = ml_collections.ConfigDict(dict(
        base_channels=8,
        channel_multipliers=(2, 4, 4),
    ))
    config.train = ml_collections.ConfigDict(dict(
        num_steps=1800,
        learning_rate=2e-3,
        warmup_steps=50,
        end_learning_rate_ratio=0.1,        # cosine decay to this fraction of the peak
        disc_learning_rate=1e-4,
        b1=0.0,
        b2=0.99,
        grad_clip_norm=1.0,
        ema_decay=0.999,                    # with warm-up: min(decay, (1 + step) / (10 + step))
        crop_size=32,                       # random spatial crops for training (0: full frames)
        crop_frames=9,                      # random 1 + 4k frame windows (0: every frame)
        time_limit_s=870.0,                 # > 0: stop (and checkpoint) after this many seconds
        log_every=25,
        checkpoint_every=600,
        video_every=600,
        max_to_keep=2,
    ))
    config.init = ml_collections.ConfigDict(dict(
        image_workdir="",                   # a trained *_image run to inflate into this 3D model
        # Or, with num_steps > 0 and no image_workdir: the image stage is trained first, in
        # WORKDIR/image_stage (this config with 1-frame kernels, single random frames, the batch
        # times batch_multiplier), then inflated. A resumed run does not train it again.
        image_stage=ml_collections.ConfigDict(dict(num_steps=0, time_limit_s=0.0, batch_multiplier=4)),
    ))
    config.data = ml_collections.ConfigDict(dict(
        dataset="soundshapes",
        data_dir="",                        # '' generates SoundShapes on the fly
        height=64,
        width=64,
        num_frames=17,
        fps=8.0,
        num_train_examples=20000,
        batch_size=8,
        read_threads=2,
    ))
    config.eval = ml_collections.ConfigDict(dict(
        split="validation",
        num_examples=128,
        batch_size=8,
        use_ema=True,
        lpips=True,
        fvd=True,
        first_frame=True,                   # also score first frames encoded alone (images)
        save_frames=True,                   # PNG grids of a few reconstructions in the workdir
        world=True,                         # SoundShapes only: caption agreement of reconstructions
    ))
    config.bench = ml_collections.ConfigDict(dict(
        batch_size=2,
        steps=3,
        warmup=1,
    ))

    if base == "paper":
        config.model.update(base_channels=128, channel_multipliers=(1, 2, 2, 4), num_res_blocks=(4, 4, 4, 4),
                            temporal_downsample=(False, True, True), codebook_bits=18, num_groups=32)
        config.discriminator.update(base_channels=128, channel_multipliers=(2, 4, 4, 4, 4))
        config.loss.update(perceptual_frames=0, gan_start_step=50000, perceptual_start_step=50000)
        config.lfq.update(entropy_anneal_steps=2000)
        config.train.update(num_steps=1_000_000, learning_rate=1e-4, warmup_steps=5000,
                            disc_learning_rate=1e-4, crop_size=0, crop_frames=0, time_limit_s=0.0, log_every=100,
                            checkpoint_every=5000, video_every=5000, max_to_keep=3)
        config.data.update(height=128, width=128, batch_size=256, num_train_examples=1_000_000,
                           read_threads=16)
        config.eval.update(num_examples=10000, batch_size=32)
        config.mesh = dict(data=-1, fsdp=1, tensor=1)
    elif base == "tiny":
        # No GAN within its 15 minutes, so Adam keeps its momentum; the paper's entropy weight 0.1
        # held colours back in short runs (see the demo variant). Whole 17-frame clips: trained on
        # 9-frame windows the later latent frames, which see longer histories, broke up. 15-minute
        # runs, idle 2-core CPU, 128 validation clips: 9-frame windows 22.6 dB, usage 0.93; whole
        # clips 26.1 dB, usage 0.77, motion read back 0.98, captions read back exactly 0.31.
        # Three times the time (45 minutes, 2,302 steps, schedule not finished) reached only
        # 27.1 dB (usage 0.67, shapes read back 0.57): more speed alone will not reach 30 dB.
        # 300 s proxies (450 steps, 128 validation clips, same-day baseline 23.9 dB), none kept:
        # channels (1, 2, 4) 22.7; full 64x64 frames at batch 2 22.7; commitment 0.0625 23.5;
        # quantization blended in over the first half of the run 23.5; one norm group 23.7. 43% of
        # the baseline's squared error lies in 8x8-block means: SoundShapes backgrounds have a
        # continuous grey level and tint, which binary tokens can only carry by dithering across
        # positions. The 4-pixel frame border is no worse than the interior.
        # MAGVIT-v2's 2D image stage, inflated into the 3D model, is what helped: 109 s of image
        # stage + 196 s of video reached 26.1 dB against 23.9 for 300 s of video alone, and in the
        # 15-minute budget 280 s + 560 s gave 27.2 dB (usage 0.65) and 400 s + 420 s 27.5 dB
        # (usage 0.65; with diversity weight 2 in the video stage 27.5 dB, usage 0.68). The image
        # stage learns faster per second: single frames at 4x the batch, 2D kernels. In the 300 s
        # proxy the decoder without its GroupNorms (so no per-frame constant is erased) gave
        # 23.7 dB, without any norm but the quantizer's 24.4, and without quantization the train
        # PSNR was only 1 dB higher: the speed of learning limits, not the quantizer. Reference: a
        # 4x4 average-pooled thumbnail of every frame, upsampled bilinearly (13,056 floats per
        # clip, against 12,800 bits of tokens), is 28.7 dB.
        config.lfq.update(entropy_weight=0.02)
        config.train.update(b1=0.9, crop_frames=0, num_steps=620, time_limit_s=420.0)
        config.init.image_stage.update(num_steps=2100, time_limit_s=400.0)
    elif base == "demo":
        # Measured on the idle 2-core CPU (200 s runs scored by the world evaluator on 32 validation
        # clips): random 32x32 crops at batch 8 give 2.5x the steps of full frames at batch 4 and
        # the first visible objects; channels (1, 2, 4, 8) halve the cost of the depth-to-space
        # convolutions; Adam with momentum (no GAN here to need beta1 = 0); one norm group per
        # frame; and an entropy weight of 0.02 instead of 0.1, which at 0.1 held the colours back
        # (colour accuracy of reconstructions 0.23 -> 0.45, objects found per clip 0.56 -> 1.13).
        config.model.update(base_channels=8, channel_multipliers=(1, 2, 4, 8), num_res_blocks=(0, 0, 1, 1),
                            temporal_downsample=(True, True, False), num_groups=1)
        config.lfq.update(entropy_weight=0.02)
        config.loss.update(perceptual_weight=0.0, gan_start_step=10**9, perceptual_start_step=10**9)
        # About 0.22 s a step on the idle 2-core CPU; the time limits keep the run (compile
        # included) under 4 minutes on a slower or busier machine. 60 s of it go to the image
        # stage (as in tiny): against 200 s of video alone (same day, 64 validation clips), colour
        # read back from reconstructions 0.41 -> 0.83, motion 0.37 -> 0.76, shape 0.25 -> 0.24,
        # PSNR 21.7 dB both, usage 0.63 -> 0.60.
        config.train.update(num_steps=600, b1=0.9, crop_size=32, crop_frames=9, time_limit_s=140.0,
                            checkpoint_every=600, video_every=0)
        config.init.image_stage.update(num_steps=450, time_limit_s=60.0)
        config.data.update(batch_size=8)
        config.eval.update(num_examples=64)
    elif base == "bench":
        config.model.update(base_channels=32, channel_multipliers=(1, 2, 2, 4), num_res_blocks=(2, 2, 2, 2),
                            temporal_downsample=(False, True, True), codebook_bits=12)
        config.loss.update(perceptual_weight=0.0, gan_start_step=10**9, perceptual_start_step=10**9)
        config.train.update(crop_size=0, crop_frames=0)
        config.data.update(batch_size=2)

    if image:
        # The 2D stage: 1-frame kernels, no temporal downsampling, single frames.
        config.model.update(temporal_kernel=1,
                            temporal_downsample=(False,) * (len(config.model.channel_multipliers) - 1))
        config.data.update(batch_size=config.data.batch_size * 4)
        config.train.update(crop_frames=1)                  # one random frame of each clip
        config.loss.update(perceptual_frames=0)
        config.eval.update(fvd=False, first_frame=False)
        config.init.image_stage.update(num_steps=0, time_limit_s=0.0)    # it is the image stage
    return config
