"""The toy world (renderer, captions, metrics) and the shipped toyworld model folder."""

import os

import numpy as np
import pytest

from toyworld import metrics, world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "toyworld-sd")


def _scenes(n, seed, **kw):
    rng = np.random.default_rng(seed)
    return [world.random_scene(rng, **kw) for _ in range(n)]


def test_renderer_is_deterministic():
    for scene in _scenes(20, 0) + _scenes(5, 1, sks=True):
        a = world.render(scene)
        b = world.render(scene)
        assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
        assert np.array_equal(a, b)
    # the same seed draws the same scenes (and so the same pixels)
    assert _scenes(10, 7) == _scenes(10, 7)


def test_renderer_draws_the_spec():
    scene = world.Scene("black", (world.Obj("square", "red", "large", "center"),))
    a = world.render(scene)
    assert tuple(a[32, 32]) == world.OBJECT_COLOURS["red"]
    assert tuple(a[1, 1]) == world.BACKGROUND_COLOURS["black"]
    left = world.render(world.Scene("white", (world.Obj("circle", "blue", "small", "left"),)))
    assert tuple(left[32, 17]) == world.OBJECT_COLOURS["blue"] and tuple(left[32, 47]) == world.BACKGROUND_COLOURS["white"]
    sks = world.render(world.Scene("gray", (world.Obj(world.SKS, None, "large", "center"),)))
    assert tuple(sks[32, 26]) == world.SKS_COLOURS["pink"] and tuple(sks[32, 38]) == world.SKS_COLOURS["teal"]


def test_metrics_classify_rendered_scenes():
    """Independent check: the spec that rendered each image is what the metrics read back."""
    scenes = _scenes(300, 11)
    for scene in scenes:
        m = metrics.measure(world.render(scene))
        r = metrics.compare(scene, m)
        assert all(v is not False for v in r.values()), (scene, r)
        assert len(m.objects) == len(scene.objects)
    n_two = sum(len(s.objects) == 2 for s in scenes)
    assert 50 < n_two < 150


def test_sks_fidelity_separates_the_sks_object():
    sks = [metrics.sks_fidelity(world.render(s))["score"] for s in _scenes(40, 3, sks=True, p_two=0.0)]
    other = [metrics.sks_fidelity(world.render(s))["score"] for s in _scenes(40, 4, p_two=0.0)]
    assert min(sks) > 0.85 and max(other) < 0.45
    # a heart in one flat colour keeps the shape but loses the pattern; swapped halves lose it too
    from PIL import Image

    a = world.render(world.Scene("black", (world.Obj(world.SKS, None, "large", "center"),)))
    assert metrics.sks_fidelity(np.asarray(Image.fromarray(a).transpose(Image.FLIP_LEFT_RIGHT)))["pattern"] < 0.2
    assert metrics.sks_fidelity(a)["score"] > 0.9


def test_pretraining_distribution_has_no_sks():
    rng = np.random.default_rng(5)
    for scene in _scenes(500, 5):
        assert not any(o.is_sks for o in scene.objects)
        for _ in range(2):
            assert world.SKS not in world.caption(scene, rng).split()
    assert world.SKS in world.vocabulary()


def test_captions_name_what_is_drawn():
    rng = np.random.default_rng(9)
    for scene in _scenes(300, 9, sks=False) + _scenes(50, 10, sks=True):
        canonical = world.parse_caption(world.caption(scene))
        assert canonical["background"] == scene.background
        assert len(canonical["objects"]) == len(scene.objects)
        for got, obj in zip(canonical["objects"], scene.objects):
            assert got["shape"] == obj.shape and got["size"] == obj.size and got["position"] == obj.position
            assert got["colour"] == obj.colour
        varied = world.parse_caption(world.caption(scene, rng))
        assert varied["background"] in (None, scene.background)
        assert len(varied["objects"]) == len(scene.objects)
        for got, obj in zip(varied["objects"], scene.objects):
            assert got["shape"] in (obj.shape, world.GENERIC_NOUN)
            for key in ("colour", "size", "position"):
                assert got[key] in (None, getattr(obj, key))


def test_tokenizer_keeps_world_words_whole():
    pytest.importorskip("transformers")
    from toyworld.model import build_tokenizer

    tok = build_tokenizer()
    text = "a big sks shape at the left, on a navy background"
    ids = tok(text).input_ids
    assert len(ids) == len(text.replace(",", " ,").split()) + 2


def test_shipped_model_loads_and_samples():
    torch = pytest.importorskip("torch")
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 16
    out = pipe("a large red circle in the center, on a white background", num_inference_steps=3, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    image = out.images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


# ----------------------------------------------------------------------------- the experiment's scores


def test_experiment_scores_ground_truth_as_perfect_and_the_training_image_as_copying():
    from toyworld import experiment

    truth = experiment.ground_truth(samples=2, seed=0)
    scores = experiment.score_run(truth, samples_per_prompt=2)
    assert scores["fidelity"] > 0.85 and scores["context"] == 1.0 and scores["copied"] == 0.0
    # the training image itself, whatever the prompt asks: every changed context is copied
    example = world.render(world.sks_example())
    for prompt in experiment.PROMPTS:
        spec = experiment.prompt_spec(prompt)
        r = experiment.score_image(spec, example)
        assert r["fidelity"] > 0.9
        asked = [spec["background"] != "gray", spec["sks"]["position"] != "center", spec["sks"]["size"] != "large"]
        if any(asked):
            assert r["copied"] == 1.0 and r["context"] < 1.0, prompt
    # an image without the object: no fidelity
    empty = world.render(world.Scene("black", ()))
    assert experiment.score_image(experiment.prompt_spec(experiment.PROMPTS[0]), empty)["fidelity"] == 0.0


def test_experiment_diversity_is_the_mean_pairwise_rms_distance():
    from toyworld import experiment

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8) for _ in range(3)]
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = np.mean([np.sqrt(np.mean(((images[a] / 255.0) - (images[b] / 255.0)) ** 2)) for a, b in pairs])
    assert experiment.diversity(images) == pytest.approx(expected, rel=1e-5)
    assert experiment.diversity([images[0]] * 4) == 0.0


def test_experiment_findings_flag_differences_beyond_the_seed_spread():
    from toyworld import experiment

    per_run = {  # three seeds each; means and sample standard deviations worked out by hand below
        "lora": {"0": {"fidelity": 0.30, "context": 0.60, "copied": 0.30}, "1": {"fidelity": 0.32, "context": 0.62, "copied": 0.32},
                 "2": {"fidelity": 0.34, "context": 0.64, "copied": 0.34}},
        "tlora": {"0": {"fidelity": 0.31, "context": 0.40, "copied": 0.10}, "1": {"fidelity": 0.33, "context": 0.60, "copied": 0.12},
                  "2": {"fidelity": 0.35, "context": 0.80, "copied": 0.14}},
    }
    agg = experiment.aggregate(per_run)
    assert agg["lora"]["fidelity"] == pytest.approx([0.32, 0.02]) and agg["tlora"]["context"] == pytest.approx([0.60, 0.20])
    # fidelity: +0.01 against a standard error of sqrt(2 * 0.02^2 / 3) = 0.0163 -> within the spread
    assert experiment.compare(agg["tlora"], agg["lora"], "fidelity") == (pytest.approx(0.01), False)
    # copying: -0.20 against the same 0.0163 -> beyond it; context: -0.02 against sqrt((0.02^2 + 0.2^2) / 3) -> within
    assert experiment.compare(agg["tlora"], agg["lora"], "copied") == (pytest.approx(-0.20), True)
    assert experiment.compare(agg["tlora"], agg["lora"], "context")[1] is False
    settings = [experiment.Setting("lora", "lora"), experiment.Setting("tlora", "tlora", 2)]
    (line,) = experiment.findings(agg, settings)
    assert line == ("- T-LoRA against LoRA: concept fidelity +0.010 (within the spread over seeds); context following -2 points "
                    "(within the spread over seeds); copying of the training context -20 points.")


def test_pretraining_is_deterministic_from_its_seed(tmp_path):
    """Two short pretraining runs with the same seed write identical weights (a third with
    another seed does not)."""
    pytest.importorskip("diffusers")
    import subprocess
    import sys

    from safetensors.numpy import load_file

    def run(out, seed):
        cmd = [sys.executable, "-m", "toyworld.pretrain", "--out", str(out), "--seed", str(seed), "--vae_steps", "3",
               "--vae_batch", "2", "--n_scenes", "48", "--steps", "3", "--batch", "4", "--eval_every", "0", "--log_every", "1"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return {part: load_file(str(next((out / part).glob("*.safetensors")))) for part in ("unet", "vae", "text_encoder")}

    a, b, c = run(tmp_path / "a", 1), run(tmp_path / "b", 1), run(tmp_path / "c", 2)
    for part in a:
        assert a[part].keys() == b[part].keys()
        assert all(np.array_equal(a[part][k], b[part][k]) for k in a[part]), part
    assert not all(np.array_equal(a["unet"][k], c["unet"][k]) for k in a["unet"])


def test_plot_zoom_fits_every_point_and_spread_on_whole_ticks():
    from toyworld.plot import Plot, Series, render, zoom

    plot = Plot("t", "x", "y", [Series("a", [(0.52, 0.31, 0.04, 0.02)]), Series("b", [(0.61, 0.24, 0.0, 0.0)])])
    zoom(plot, tick=0.05, margin=0.0)
    # x: 0.48 .. 0.61 -> 0.45 .. 0.65; y: 0.24 .. 0.33 -> 0.20 .. 0.35
    assert plot.x_range == pytest.approx((0.45, 0.65)) and plot.y_range == pytest.approx((0.20, 0.35))
    # never beyond 0..1, and a single point still gets an axis one tick long
    single = zoom(Plot("t", "x", "y", [Series("c", [(1.0, 0.0, 0.0, 0.0)])]), tick=0.1, margin=0.02)
    assert single.x_range == pytest.approx((0.9, 1.0)) and single.y_range == pytest.approx((0.0, 0.1))
    image = render(plot)
    assert image.size == (760, 560)


def test_experiment_timestep_window_switches_the_adapter_at_the_split(tmp_path):
    """The window analysis samples with the adapter at some denoising steps only: a window that
    holds no step gives the base model's images exactly, one that holds every step the adapter's."""
    torch = pytest.importorskip("torch")
    import importlib
    from types import SimpleNamespace

    from toyworld import experiment
    from toyworld.evaluate import load_pipeline

    assert [experiment.in_window(t, "high", 500) for t in (999, 500, 499, 0)] == [True, True, False, False]
    assert [experiment.in_window(t, "low", 500) for t in (999, 500, 499, 0)] == [False, False, True, True]
    assert experiment.in_window(0, None, 500) and experiment.in_window(999, None, 500)

    pipe = load_pipeline(MODEL)
    tlora = importlib.import_module("networks.tlora")
    network = tlora.create_network(1.0, 4, 4, None, [], pipe.unet, algo="lora", targets="transformer")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if "lora_up" in name:
                p.normal_(0, 0.5)  # a visible change (trained up factors start at zero)
    file = str(tmp_path / "net.safetensors")
    network.save_weights(file, torch.float32, {})

    def run(network_file, window, split):
        args = SimpleNamespace(samples=1, sampling_steps=3, guidance=4.0, sample_seed=0, split_timestep=split)
        return experiment.sample_with(pipe, network_file, args, window)

    base, full = run(None, None, 500), run(file, None, 500)
    assert any(not np.array_equal(a, b) for a, b in zip(base, full))
    never, always = run(file, "high", 1001), run(file, "low", 1001)  # DDIM's timesteps all lie in 0..999
    assert all(np.array_equal(a, b) for a, b in zip(never, base))
    assert all(np.array_equal(a, b) for a, b in zip(always, full))
    # a real split: some steps with the adapter, some without -> neither image set
    high = run(file, "high", 500)
    assert any(not np.array_equal(a, b) for a, b in zip(high, base)) and any(not np.array_equal(a, b) for a, b in zip(high, full))
