"""Every explanation method from the exported graphs against pytorch-grad-cam 1.5.7 and Captum 0.9.

mnist_cnn's folder is exported once per module (about a minute on two shared cores); the other
zoo models are checked in the `slow` grid. Models are untrained but He-initialised
(tests/support/gradcam_probes.realistic_init) and see real test digits with mixed targets.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from export.errors import ExportVerificationError
from export.gradcam import methods as graphs
from export.gradcam import references
from export.gradcam.bundle import INLINE_BYTES, export_bundle
from export.gradcam.run import MethodRunner
from export.gradcam.verify_methods import RELATIVE_TOL, TOLERANCES, verify_methods
from export.pipeline import explainer_targets
from modelrepo import (
    ALL_METHODS,
    CAM,
    CAM_RAW,
    EXPLAINED_CLASS,
    FEATURES_FILE,
    FORWARD_FILE,
    HEAD_FILE,
    INPUT,
    METHODS_DIR,
    MODEL_FILE,
    SALIENCY_FILE,
    WEIGHTS_FILE,
)
from modelrepo import methods as method_variants
from tests.support.gradcam_probes import realistic_init
from training.mnist import MEAN, STD, load_mnist
from training.models import MODELS

NUM_CLASSES = 10
# The export and the references take minutes on two busy shared cores.
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    images, _ = load_mnist("test")
    return (images[:12].astype(np.float32) / 255.0)[:, None]


@pytest.fixture(scope="module")
def mnist_model() -> nn.Module:
    torch.manual_seed(0)
    return realistic_init(MODELS["mnist_cnn"].build())


@pytest.fixture(scope="module")
def mnist_folder(tmp_path_factory: pytest.TempPathFactory, mnist_model: nn.Module) -> Path:
    folder = tmp_path_factory.mktemp("methods") / "1"
    export_bundle(mnist_model, "act2", (1, 28, 28), MEAN, STD, NUM_CLASSES, folder)
    return folder


def test_every_method_matches_its_reference_library(
    mnist_folder: Path, mnist_model: nn.Module, digits: np.ndarray
) -> None:
    targets = explainer_targets(len(digits), NUM_CLASSES)
    checks = verify_methods(mnist_folder, mnist_model, "act2", digits, targets, MEAN, STD)
    assert sorted(checks) == sorted(ALL_METHODS)
    for name, check in checks.items():
        assert check.max_relative <= TOLERANCES.get(name, RELATIVE_TOL), name
        # Most images agree to 1e-4 even where the bound is looser.
        assert check.within_1e4 >= 0.9, name
    # EigenCAM's projection agrees up to sign; the share with LAPACK's sign is measured.
    assert checks["eigencam"].sign_agreement is not None


def test_maps_are_far_from_zero_and_differ_between_methods(
    mnist_folder: Path, mnist_model: nn.Module, digits: np.ndarray
) -> None:
    runner = MethodRunner(mnist_folder)
    targets = explainer_targets(8, NUM_CLASSES)
    maps = {m: runner.explain(m, digits[:8], targets) for m in ALL_METHODS}
    explained = references.explained_classes(mnist_model, digits[:8], targets, MEAN, STD)
    for name, got in maps.items():
        np.testing.assert_array_equal(got[EXPLAINED_CLASS], explained)
        assert got[CAM].shape == (8, 28, 28)
        assert np.isfinite(got[CAM]).all() and got[CAM].min() >= 0 and got[CAM].max() <= 1
        assert np.abs(got[CAM_RAW]).reshape(8, -1).max(axis=1).min() > 1e-4, name
    # A graph that ignored its method would repeat another's map. One pair is equal by design
    # here: on a ReLU's output (A >= 0), ReLU(G * A) = ReLU(G) * A, so Grad-CAM element-wise and
    # LayerCAM coincide.
    same = {("gradcam_elementwise", "layercam")}
    for a in ALL_METHODS:
        for b in ALL_METHODS:
            if (a, b) in same:
                np.testing.assert_allclose(maps[a][CAM_RAW], maps[b][CAM_RAW], rtol=1e-5)
            elif a < b and maps[a][CAM_RAW].shape == maps[b][CAM_RAW].shape:
                assert not np.allclose(maps[a][CAM_RAW], maps[b][CAM_RAW], atol=1e-6), (a, b)


@pytest.mark.parametrize("method", ["gradcam_plusplus", "scorecam", "ablationcam", "eigencam"])
def test_an_image_gets_the_same_map_alone_or_in_a_batch(
    mnist_folder: Path, digits: np.ndarray, method: str
) -> None:
    runner = MethodRunner(mnist_folder)
    targets = explainer_targets(5, NUM_CLASSES)
    batch = runner.explain(method, digits[:5], targets)
    alone = runner.explain(method, digits[4:5], targets[4:5])
    np.testing.assert_allclose(batch[CAM_RAW][4], alone[CAM_RAW][0], rtol=1e-4, atol=1e-6)


def test_classifier_weights_are_stored_once(mnist_folder: Path, mnist_model: nn.Module) -> None:
    parameters = sum(p.numel() * 4 for p in mnist_model.parameters())
    weights = (mnist_folder / WEIGHTS_FILE).stat().st_size
    # Each large tensor once (page-aligned), small biases inline in their graphs.
    assert parameters * 0.95 < weights < parameters * 1.05
    for name in (MODEL_FILE, SALIENCY_FILE, FORWARD_FILE, HEAD_FILE, FEATURES_FILE):
        proto = onnx.load(str(mnist_folder / name), load_external_data=False)
        inline = [
            t.name
            for t in proto.graph.initializer
            if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) >= INLINE_BYTES
        ]
        assert not inline, (name, inline)
        locations = {
            e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"
        }
        assert locations == {WEIGHTS_FILE}, name
    for path in (mnist_folder / METHODS_DIR).glob("*.onnx"):
        assert path.stat().st_size < 100_000, path  # weight-free (IG's quadrature table aside)


@pytest.mark.parametrize("method", ["eigencam", "scorecam", "ablationcam"])
def test_gradient_free_cams_run_a_forward_pass_and_older_folders_the_explainer(
    mnist_folder: Path, digits: np.ndarray, method: str, tmp_path: Path
) -> None:
    runner = MethodRunner(mnist_folder)
    targets = explainer_targets(4, NUM_CLASSES)
    opened: list[str] = []
    run = runner.run

    def counted(relative: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        opened.append(relative)
        return run(relative, feeds)

    runner.run = counted  # type: ignore[method-assign]
    fresh = runner.explain(method, digits[:4], targets)
    assert FEATURES_FILE in opened and MODEL_FILE not in opened, opened
    older = tmp_path / "1"
    shutil.copytree(mnist_folder, older)
    (older / FEATURES_FILE).unlink()  # a folder exported before the features graph
    before = MethodRunner(older).explain(method, digits[:4], targets)
    np.testing.assert_allclose(fresh[CAM_RAW], before[CAM_RAW], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(fresh[EXPLAINED_CLASS], before[EXPLAINED_CLASS])


def test_verification_names_the_method_that_differs(
    mnist_folder: Path, mnist_model: nn.Module, digits: np.ndarray, tmp_path: Path
) -> None:
    broken = tmp_path / "1"
    shutil.copytree(mnist_folder, broken)
    # XGrad-CAM's graph replaced by Grad-CAM's: same inputs, other arithmetic.
    shutil.copyfile(broken / METHODS_DIR / "gradcam.onnx", broken / METHODS_DIR / "xgradcam.onnx")
    targets = explainer_targets(6, NUM_CLASSES)
    with pytest.raises(ExportVerificationError, match=r"xgradcam by [0-9.e+-]+ \(max abs"):
        verify_methods(broken, mnist_model, "act2", digits[:6], targets, MEAN, STD)


def test_integrated_gradients_off_by_a_little_on_every_image_fails(
    mnist_folder: Path, mnist_model: nn.Module, digits: np.ndarray
) -> None:
    """IG's bound (1e-2) leaves room for a kink taken the other way on a few images; a model
    0.1% off on every logit (the same classes explained) is within it and must still fail."""
    import copy

    scaled = copy.deepcopy(mnist_model)
    with torch.no_grad():
        scaled.fc2.weight.mul_(1.001)
        scaled.fc2.bias.mul_(1.001)
    targets = explainer_targets(6, NUM_CLASSES)
    with pytest.raises(ExportVerificationError, match=r"integrated_gradients on 6 of 6 images"):
        verify_methods(
            mnist_folder, scaled, "act2", digits[:6], targets, MEAN, STD,
            methods=("integrated_gradients",),
        )  # fmt: skip


@pytest.mark.parametrize(("layer", "channels"), [((15, 20), 16), ((3, 3), 40), ((7, 7), 64)])
def test_first_component_equals_the_svd_with_its_sign_corrected(
    layer: tuple[int, int], channels: int
) -> None:
    """The power iteration against numpy's SVD, tall and wide, with pytorch-grad-cam's own sign
    correction (get_2d_projection_with_sign_correction: the largest |entry| positive)."""
    positions = layer[0] * layer[1]
    generator = np.random.default_rng(0)
    low_rank = generator.normal(size=(4, channels, 3)) @ generator.normal(size=(4, 3, positions))
    a = (low_rank + 0.1 * generator.normal(size=(4, channels, positions))).astype(np.float32)
    a = a.reshape(4, channels, *layer)
    shapes = graphs.Shapes(channels, layer, (1, 28, 28), NUM_CLASSES)
    model = graphs.gradient_cam("eigencam", shapes)
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (projection,) = session.run(["projection"], {"activations": a})
    references.pytorch_grad_cam()
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

    want = get_2d_projection_with_sign_correction(a)
    scale = np.abs(want).reshape(4, -1).max(axis=1)
    diff = np.abs(projection - want).reshape(4, -1).max(axis=1)
    assert (diff / scale).max() < 1e-4


def test_integrated_gradients_steps_are_captums() -> None:
    from captum.attr._utils.approximation_methods import approximation_parameters

    alphas, sizes = graphs._gauss_legendre_tables()
    step_sizes, alpha_list = approximation_parameters("gausslegendre")
    for n in (1, 2, 50, 128):
        np.testing.assert_allclose(alphas[n - 1, :n], alpha_list(n), rtol=0, atol=1e-7)
        np.testing.assert_allclose(sizes[n - 1, :n], step_sizes(n), rtol=0, atol=1e-7)
        assert not alphas[n - 1, n:].any()


@pytest.mark.parametrize("steps", [1, 7])
def test_integrated_gradients_any_step_count(
    mnist_folder: Path, mnist_model: nn.Module, digits: np.ndarray, steps: int
) -> None:
    targets = explainer_targets(4, NUM_CLASSES)
    got = MethodRunner(mnist_folder).explain("integrated_gradients", digits[:4], targets, steps)
    explained = references.explained_classes(mnist_model, digits[:4], targets, MEAN, STD)
    want = references.captum_reference(
        "integrated_gradients", mnist_model, digits[:4], explained, MEAN, STD, steps=steps
    )
    scale = np.abs(want).reshape(4, -1).max(axis=1)
    diff = np.abs(got[CAM_RAW] - want).reshape(4, -1).max(axis=1)
    assert (diff / scale).max() < 1e-3


@pytest.mark.parametrize("method", ["integrated_gradients", "scorecam"])
def test_a_graph_run_holds_at_most_max_variants_and_the_maps_do_not_change(
    mnist_folder: Path, digits: np.ndarray, method: str
) -> None:
    """Large requests are split into runs of at most MAX_VARIANTS images (their memory is what a
    client controls), and splitting changes no map."""
    runner = MethodRunner(mnist_folder)
    rows: list[int] = []
    run = runner.run

    def counted(relative: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows.append(max(len(v) for v in feeds.values()))
        return run(relative, feeds)

    runner.run = counted  # type: ignore[method-assign]
    targets = explainer_targets(6, NUM_CLASSES)
    split = runner.explain(method, digits[:6], targets, 100)
    assert max(rows) <= method_variants.MAX_VARIANTS < 6 * 64
    whole = MethodRunner(mnist_folder)
    saved = method_variants.MAX_VARIANTS
    method_variants.MAX_VARIANTS = 10_000
    try:
        alone = whole.explain(method, digits[:6], targets, 100)
    finally:
        method_variants.MAX_VARIANTS = saved
    np.testing.assert_allclose(split[CAM_RAW], alone[CAM_RAW], rtol=1e-4, atol=1e-6)


def test_served_method_graphs_give_their_arena_back_after_each_run(mnist_folder: Path) -> None:
    from service.core.ort_options import SHRINKAGE
    from service.explain.methods import MethodGraphs

    graphs = MethodGraphs(mnist_folder)
    graphs.run(FEATURES_FILE, {INPUT: np.zeros((1, 1, 28, 28), np.float32)})
    session = graphs._sessions[FEATURES_FILE]
    assert session._run_options is not None
    assert session._run_options.get_run_config_entry(SHRINKAGE) == "cpu:0"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(MODELS) - {"mnist_cnn"}))
def test_every_zoo_model_offers_every_method_verified(name: str, tmp_path: Path) -> None:
    spec = MODELS[name]
    torch.manual_seed(0)
    model = realistic_init(spec.build())
    folder = tmp_path / "1"
    export_bundle(model, spec.gradcam_layer, spec.input_shape, MEAN, STD, NUM_CLASSES, folder)
    if spec.input_shape == (1, 28, 28):
        images, _ = load_mnist("test")
        pixels = (images[:8].astype(np.float32) / 255.0)[:, None]
    else:
        generator = torch.Generator().manual_seed(0)
        pixels = torch.rand((8, *spec.input_shape), generator=generator).numpy()
    targets = explainer_targets(8, NUM_CLASSES)
    checks = verify_methods(folder, model, spec.gradcam_layer, pixels, targets, MEAN, STD)
    two_d = len(spec.input_shape) == 3
    expected = set(ALL_METHODS) - (set() if two_d else {"scorecam", "ablationcam"})
    assert set(checks) == expected
