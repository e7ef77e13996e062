"""The whole pipeline at minimal sizes: `videolm demo --profile smoke`, then `videolm generate` on its LM."""
import json
import os

import numpy as np
import pytest

from tests.test_gallery import assert_links_exist, parse
from videolm import cli, media, tasks
from videolm.demo import _load_clips, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    logs = []
    report = run_demo(str(out), profile="smoke", num_shown=1, progress=False, log=logs.append)
    return str(out), report, logs


def test_demo_runs_every_stage_and_scores_every_task(demo):
    out, report, logs = demo
    assert not any("already done" in line for line in logs)
    for split in ("test", "compositional"):
        assert set(report["tasks"][split]) == set(tasks.TASKS)
        for task, headline in report["tasks"][split].items():
            assert headline["name"] and (headline["value"] is None or np.isfinite(headline["value"])), (split, task)
        # the evaluator scores the tokenizers' round trip of the same clips (the ceiling)
        assert set(report["reconstruction"][split]) >= {"caption exact match", "pitch accuracy"}
        assert report["ground_truth"][split] == 1.0
    for task in tasks.TASKS:
        assert np.isfinite(report["lm_eval"][f"{task}/loss"]) and report["lm_eval"][f"{task}/unigram_loss"] > 0
    with open(os.path.join(out, "report.json")) as f:
        assert json.load(f)["tasks"] == json.loads(json.dumps(report["tasks"]))
    links = assert_links_exist(report["index"])
    generated = [link for link in links if "generated" in link]
    # one shown clip per task and split: an mp4 (with sound) per video task, a png for text-to-image
    assert sum(link.endswith(".png") for link in generated) == 2
    assert sum(link.endswith(".mp4") for link in generated) == 2 * (len(tasks.TASKS) - 1)
    clip = media.read_video(os.path.join(out, [link for link in generated if "t2v" in link][0]))
    assert clip.video.shape[0] == 9 and clip.audio is not None  # (the gallery upscales small frames)
    _, text = parse(report["index"])
    assert "shuffled" in text and "reconstruction" in text


def test_demo_rerun_skips_every_stage(demo):
    out, report, _ = demo
    logs = []
    again = run_demo(out, profile="smoke", num_shown=1, progress=False, log=logs.append)
    assert sum("already done" in line for line in logs) == 8
    assert again["tasks"] == json.loads(json.dumps(report["tasks"]))


def _inputs(out, tmp_path):
    """A test clip of the demo's data as files: mp4 with sound, wav, png."""
    clip = _load_clips(os.path.join(out, "data"), "test", 1)[0][0]
    video_path, audio_path, image_path = tmp_path / "in.mp4", tmp_path / "in.wav", tmp_path / "in.png"
    media.write_mp4(video_path, clip["video"], 8.0, audio=clip["audio"], sample_rate=16000)
    media.write_wav(audio_path, clip["audio"], 16000)
    media.write_png(image_path, clip["video"][0])
    return str(video_path), str(audio_path), str(image_path)


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_generate_every_task_writes_playable_media(demo, task, tmp_path):
    out, _, _ = demo
    video_path, audio_path, image_path = _inputs(out, tmp_path)
    inputs = {}
    needs = {"prompt": ["--prompt", "a red circle moves up"], "image": ["--image", str(image_path)],
             "video": ["--video", str(video_path)], "audio": ["--audio", str(audio_path)]}
    from videolm.generate import TASK_INPUTS
    for name in TASK_INPUTS[task][0]:
        inputs[name] = needs[name]
    args = ["generate", "--workdir", os.path.join(out, "lm"), "--task", task, "--out", str(tmp_path / "gen"),
            "--num-samples", "2", "--guidance", "1.5", "--seed", "3"]
    assert cli.main(args + [a for v in inputs.values() for a in v]) == 0
    with open(tmp_path / "gen" / "settings.json") as f:
        settings = json.load(f)
    assert settings["task"] == task and settings["seed"] == 3 and len(settings["outputs"]) == 2
    for path in settings["outputs"]:
        if tasks.get_task(task).output == "image":
            assert path.endswith(".png") and media.read_image(path).shape == (32, 32, 3)
        else:
            got = media.read_video(path)
            assert got.video.shape == (9, 32, 32, 3) and got.audio is not None and got.audio.size > 0


def test_generate_long_video(demo, tmp_path):
    out, _, _ = demo
    args = ["generate", "--workdir", os.path.join(out, "lm"), "--task", "t2v", "--prompt", "a blue square moves down",
            "--seconds", "2", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    got = media.read_video(str(tmp_path / "t2v_00.mp4"))
    assert got.video.shape[0] == 16 and got.audio is not None  # 2 s at 8 fps, extended past the 9-frame clip


def test_generate_refuses_bad_inputs(demo, tmp_path, capsys):
    out, _, _ = demo
    video, audio, image = _inputs(out, tmp_path)
    silent = str(tmp_path / "silent.mp4")
    media.write_mp4(silent, media.read_video(video).video, 8.0)
    lm = ["generate", "--workdir", os.path.join(out, "lm"), "--out", str(tmp_path / "gen")]
    cases = [
        (["--task", "t2v"], "task 't2v' needs --prompt"),
        (["--task", "a2v"], "task 'a2v' needs --audio"),
        (["--task", "t2v", "--prompt", "x", "--audio", audio], "task 't2v' does not read --audio"),
        (["--task", "dance"], "unknown task 'dance'; known tasks: unconditional, t2v"),
        (["--task", "v2a", "--video", str(tmp_path / "missing.mp4")], "--video " + str(tmp_path / "missing.mp4")
         + " does not exist"),
        (["--task", "av_continuation", "--video", silent], "needs sound: --audio, or a --video with an audio track"),
        (["--task", "t2i", "--prompt", "x", "--seconds", "3"], "--seconds applies to video outputs"),
    ]
    for extra, message in cases:
        assert cli.main(lm + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)
    assert cli.main(["generate", "--workdir", str(tmp_path), "--task", "t2v", "--prompt", "x"]) == 2
    assert "config.json of an LM run" in capsys.readouterr().err


def test_chaining_script_feeds_each_output_to_the_next_task(demo, tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("chain", os.path.join(os.path.dirname(__file__), os.pardir,
                                                                        "experiments", "chain.py"))
    chain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chain)
    out, _, _ = demo
    report = chain.main(["--workdir", os.path.join(out, "lm"), "--out", str(tmp_path), "--seconds", "2"])
    assert report["style_prompt"] == "a blue circle moves up"
    assert media.read_image(report["outputs"]["t2i"]).shape == (32, 32, 3)
    assert media.read_video(report["outputs"]["stylize+v2a"]).audio is not None
    assert media.read_video(report["outputs"]["long"]).video.shape[0] == 16
