"""The evaluation's reconstruction and ladder sections, piece by piece (known answers, settings).

The whole stage with both sections on a broken model, where every demo check must FAIL, is
tests/test_evaluation.py::test_every_check_fails_on_a_broken_model (it shares that module's
trained segmenter).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scripts.attributes import ATTRIBUTE_NAMES
from scripts.errors import ConfigError
from scripts.evaluation import LadderSettings, ReconstructionSettings
from scripts.evaluation.ladders import plan
from scripts.evaluation.reconstruction import psnr_ssim, to_original_geometry
from scripts.evaluation.volumes import to_network_layout


def test_original_geometry_inverts_the_network_crop():
    rng = np.random.default_rng(0)
    for shape in ((50, 47, 13), (40, 40, 9)):
        array = rng.random(shape).astype(np.float32)
        net = to_network_layout(array, (8, 48, 48))
        back = to_original_geometry(net, shape)
        assert back.shape == shape
        # every voxel the crop kept comes back where it was (after the per-image scaling)
        kept = back > 0
        again = to_network_layout(array, None)
        assert np.allclose(back[kept], np.transpose(again, (1, 2, 0))[kept])


def test_psnr_ssim_known_answers():
    rng = np.random.default_rng(0)
    x = rng.random((2, 4, 32, 32)).astype(np.float32)
    x[:, 0] = 0.0  # a padding slice: left out of the SSIM
    p, s = psnr_ssim(x, x.copy())
    assert np.all(s > 0.999) and np.all(p > 80)
    noisy = np.clip(x + 0.1 * rng.standard_normal(x.shape).astype(np.float32), 0, 1)
    p, s = psnr_ssim(x, noisy)
    assert np.all((p > 18) & (p < 22)) and np.all(s < 0.99)  # 0.1 noise: PSNR near 20 dB
    flat = np.where(x > 0, 0.5, 0.0).astype(np.float32)  # the structure gone
    assert np.all(psnr_ssim(x, flat)[1] < 0.1)


def test_ladder_requests_name_one_attribute():
    settings = LadderSettings(lvedv=(80, 280), lvef=(40,), seeds=(0, 1), esed_seeds=(3,), given={"AGE": 65})
    ladders = plan(settings)
    named = {name: {tuple(np.flatnonzero(np.isfinite(r))) for r, _ in items} for name, items in ladders.items()}
    from scripts.attributes import ATTRIBUTE_NAMES as N

    assert named["LVEDV"] == {tuple(sorted((N.index("LVEDV"), N.index("ESED"), N.index("AGE"))))}
    assert named["LVEF"] == {tuple(sorted((N.index("LVEF"), N.index("ESED"), N.index("AGE"))))}
    assert named["ESED"] == {tuple(sorted((N.index("ESED"), N.index("AGE"))))}
    assert len(ladders["LVEDV"]) == 4 and len(ladders["LVEF"]) == 4 and len(ladders["ESED"]) == 2
    with pytest.raises(ConfigError, match="ladders#given"):
        LadderSettings(given={"LVEDV": 100})
    with pytest.raises(ConfigError, match="reconstruction#split"):
        ReconstructionSettings(split="training")


def test_reconstruction_of_a_perfect_autoencoder_passes_its_checks(monkeypatch, cohorts, tmp_path):
    """The positive side: a near-perfect "autoencoder" (the input plus faint noise) meets the targets: they can pass."""
    from scripts.evaluation.reconstruction import evaluate_reconstruction
    from scripts.evaluation.volumes import load_real

    class Identity(torch.nn.Module):
        def encode_stage_2_inputs(self, x):
            return x

        def decode_stage_2_outputs(self, z):
            return z + 1e-3 * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))

    real = load_real(str(cohorts["public"] / "datalist.json"), "test", (16, 64, 64), with_labels=True)
    figure = str(tmp_path / "eval_reconstructions.png")
    out = evaluate_reconstruction(
        real, Identity(), None, ReconstructionSettings(), str(tmp_path / "rec"), "cpu", batch_size=2, figure=figure
    )
    assert out["figure"] == figure and open(figure, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert out["psnr_db_median"] > 50 and out["ssim_median"] > 0.99
    assert out["classical_detector"]["reconstructions"]["lv_found_rate"] == 1.0
    assert out["contrast"]["ratio_median"] == pytest.approx(1.0, abs=0.01)


def _ring_volumes(values: np.ndarray, seeds) -> np.ndarray:
    """(B, 16, 64, 64) stacks: a bright pool of the requested LVEDV inside a dark ring, 8 slices
    tapering to the apex (a pool of constant cross-section is a vessel to the detector)."""
    lvedv = values[:, ATTRIBUTE_NAMES.index("LVEDV")]
    taper = np.array([1.0, 1.0, 0.95, 0.9, 0.85, 0.75, 0.65, 0.5])
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 32, xx - 32) * 1.8  # mm
    out = np.full((len(values), 16, 64, 64), 0.5, dtype=np.float32)
    for b, v in enumerate(lvedv):
        radius = np.sqrt(v * 1000.0 / (np.pi * 10.0 * np.sum(taper**2)))  # 10 mm slices
        for z, t in enumerate(taper, start=4):
            out[b, z][r < t * radius + 8.0] = 0.1
            out[b, z][r < t * radius] = 0.9
    return out


def test_ladder_of_a_controlled_model_measures_it_and_draws_it(tmp_path):
    """A model whose pool grows with the request: rho 1 by both instruments, and the picture is drawn."""
    from scripts.evaluation.ladders import run_ladders
    from scripts.evaluation.plots import save_all

    settings = LadderSettings(lvedv=(80, 160, 280), lvef=(), seeds=(0, 1), esed_seeds=())

    def segment(volumes, spacing):
        return [{"LV_VOLUME": float((v > 0.7).sum() * np.prod(sp) / 1000.0)} for v, sp in zip(volumes, spacing)]

    out = run_ladders(
        settings, _ring_volumes, segment, (1.8, 1.8, 10.0), lambda m: m["LV_VOLUME"] > 5, figures_dir=str(tmp_path)
    )
    lvedv = out["LVEDV"]
    for instrument in ("segmenter", "classical"):
        assert lvedv[instrument]["lv_found_rate"] == 1.0
        assert lvedv[instrument]["spearman_rho_per_seed"] == {"0": 1.0, "1": 1.0}
    # the classical detector measures the drawn pools (80 / 160 / 280 ml, pixelated)
    assert np.allclose(lvedv["classical"]["measured_ml"][:3], (80, 160, 280), rtol=0.1)
    figure = tmp_path / "eval_ladder_LVEDV.png"
    assert lvedv["figure"] == str(figure) and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert save_all({"ladders": out}, {}, str(tmp_path)) == {"ladder_LVEDV": str(figure)}
    # without a folder nothing is drawn
    assert "figure" not in run_ladders(settings, _ring_volumes, segment, (1.8, 1.8, 10.0), lambda m: True)["LVEDV"]
