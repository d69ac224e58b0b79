"""Models, clinical preprocessing, augmentation and the training step (tiny tensors, CPU)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from scipy.special import logsumexp

from psma_lib.cox import neg_partial_log_likelihood
from psma_lib.errors import InputError
from psma_lib.models import (
    ClinicalPreprocessor,
    ImageEncoder,
    SurvivalModel,
    aggregate_lesion_risks,
    load_pretrained,
    normalize_intensity,
    segment_aggregate,
)
from psma_lib.train import (
    SurvivalData,
    TrainConfig,
    augment_batch,
    auxiliary_loss,
    fit,
    patient_loss,
    predict,
)


def _clinical_frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"age": rng.normal(70, 8, n), "psa": np.exp(rng.normal(2, 1, n))})


def test_preprocessor_fitted_on_training_rows_only():
    train, test = _clinical_frame(40), _clinical_frame(10, seed=1)
    train.loc[[3, 7], "age"] = np.nan
    pre = ClinicalPreprocessor(["age", "psa"]).fit(train)
    mean_before = pre.mean.clone()
    extreme = test.copy()
    extreme["age"], extreme["psa"] = 1e6, 1e9
    features = pre.transform(extreme)
    assert torch.equal(pre.mean, mean_before)  # transform never refits
    refit = ClinicalPreprocessor(["age", "psa"]).fit(pd.concat([train, extreme]))
    assert not torch.allclose(refit.mean, mean_before)  # ...whereas fitting on them would move it
    # training rows: imputed with the training median, standardised to mean 0 / sd 1
    x = pre.transform(train)
    assert x.shape == (40, 4)
    assert np.allclose(x[:, :2].double().mean(0), 0, atol=1e-6)
    assert np.allclose(x[:, :2].double().std(0, unbiased=False), 1, atol=1e-5)
    assert x[:, 2].tolist() == [1.0 if i in (3, 7) else 0.0 for i in range(40)]  # missing indicator
    median_age = np.nanmedian(train["age"])
    expected = (median_age - pre.mean[0].item()) / pre.std[0].item()
    assert x[3, 0].item() == pytest.approx(expected, rel=1e-5)
    # log1p for PSA, then the training mean/sd
    psa = math.log1p(1e9)
    assert features[0, 1].item() == pytest.approx((psa - pre.mean[1].item()) / pre.std[1].item(), rel=1e-5)


def test_preprocessor_state_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    pre = ClinicalPreprocessor(["age", "psa"]).fit(_clinical_frame(20))
    save_file(pre.state_dict(), tmp_path / "pre.safetensors")
    again = ClinicalPreprocessor.from_state_dict(load_file(tmp_path / "pre.safetensors"), ["age", "psa"])
    frame = _clinical_frame(5, seed=3)
    assert torch.equal(pre.transform(frame), again.transform(frame))


def test_normalisation_windows():
    x = torch.tensor([[0.0, -2000.0], [50.0, 500.0], [1000.0, 5000.0]]).view(3, 2, 1, 1)
    y = normalize_intensity(x).view(3, 2)
    assert y[:, 0].tolist() == pytest.approx([0.0, 1.0, math.log1p(100) / math.log1p(50)])
    assert y[:, 1].tolist() == pytest.approx([-1.0, 0.0, 1.0])


def test_imaging_model_refuses_clinical_input():
    model = SurvivalModel("imaging", "resnet18")
    images = torch.rand(2, 2, 32, 32)
    with pytest.raises(ValueError, match="must not receive clinical"):
        model(images, torch.zeros(2, 4))
    assert model.n_clinical == 0 and model.head[1].in_features == model.encoder.dim
    with pytest.raises(ValueError, match="must not receive images"):
        SurvivalModel("clinical", n_clinical=4)(images, torch.zeros(2, 4))


@pytest.mark.parametrize("backbone,shape,view", [
    ("resnet18", (2, 32, 32), "axial"), ("resnet34", (2, 32, 32), "axial"),
    ("resnet50", (2, 32, 32), "axial"), ("resnet18", (3, 2, 32, 32), "orthogonal"),
    ("r3d_18", (2, 16, 16, 16), "axial"),
])
def test_finite_gradients_every_backbone(backbone, shape, view):
    from psma_lib.cox import neg_partial_log_likelihood

    torch.manual_seed(0)
    model = SurvivalModel("multimodal", backbone, n_clinical=4, view=view)
    images = torch.rand(4, *shape) * 20
    log_hazard = model(images, torch.randn(4, 4))
    assert log_hazard.shape == (4,)
    loss = neg_partial_log_likelihood(log_hazard, torch.tensor([3.0, 5.0, 5.0, 9.0]), torch.tensor([1, 1, 0, 1]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in model.encoder.parameters() for g in [g.grad])


def test_attention_bags_match_single_lesion_and_are_permutation_invariant():
    torch.manual_seed(0)
    model = SurvivalModel("imaging", "resnet18", attention=True).eval()
    images = torch.rand(5, 2, 32, 32) * 10
    bag = torch.tensor([0, 0, 1, 1, 1])
    with torch.no_grad():
        out, _ = model.forward_bags(images, bag, 2)
        perm = torch.tensor([4, 1, 3, 0, 2])
        out_perm, _ = model.forward_bags(images[perm], bag[perm], 2)
        single, _ = model.forward_bags(images[:1], torch.tensor([0]), 1)
        assert torch.allclose(single, model.head(model.encoder(images[:1])).squeeze(1), atol=1e-5)
    assert torch.allclose(out, out_perm, atol=1e-5)


def test_aggregation_mean_max_and_sum_against_scipy_logsumexp():
    lesions = pd.DataFrame({"patient_id": ["b", "a", "a", "b"], "log_hazard": [0.5, 1.0, 3.0, -1.5]})
    assert aggregate_lesion_risks(lesions, "mean").to_dict() == {"a": 2.0, "b": -0.5}
    assert aggregate_lesion_risks(lesions, "max").to_dict() == {"a": 3.0, "b": 0.5}
    geometric = aggregate_lesion_risks(lesions, "geometric")  # log n + mean h = log(n * geometric mean hazard)
    assert np.allclose(geometric.to_numpy(), np.log([2 * np.sqrt(np.e * np.e**3), 2 * np.sqrt(np.e**0.5 * np.e**-1.5)]))
    equal = pd.DataFrame({"patient_id": ["a", "a", "a"], "log_hazard": [0.7, 0.7, 0.7]})  # equal hazards: = sum
    assert np.isclose(aggregate_lesion_risks(equal, "geometric")["a"], aggregate_lesion_risks(equal, "sum")["a"])
    summed = aggregate_lesion_risks(lesions, "sum")
    assert np.isclose(summed["a"], logsumexp([1.0, 3.0])) and np.isclose(summed["b"], logsumexp([0.5, -1.5]))
    # stable where a naive log(sum(exp)) overflows
    huge = pd.DataFrame({"patient_id": ["a", "a"], "log_hazard": [1000.0, 1000.0]})
    assert np.isclose(aggregate_lesion_risks(huge, "sum")["a"], 1000.0 + np.log(2.0))
    with pytest.raises(InputError):
        aggregate_lesion_risks(lesions, "median")


@pytest.mark.parametrize("how", ["mean", "max", "sum", "geometric"])
def test_segment_aggregate_matches_the_pandas_aggregation(how):
    rng = np.random.default_rng(0)
    bag = torch.tensor([2, 0, 1, 0, 2, 2, 1])
    h = torch.tensor(rng.normal(size=7) * 5, requires_grad=True)
    frame = pd.DataFrame({"patient_id": bag.numpy(), "log_hazard": h.detach().numpy()})
    expected = aggregate_lesion_risks(frame, how).to_numpy()
    got = segment_aggregate(h, bag, 3, how)
    assert np.allclose(got.detach().double().numpy(), expected, atol=1e-5)
    got.sum().backward()
    if how == "sum":  # d logsumexp / d h_l = softmax weight of h_l within its bag
        weights = torch.cat([torch.softmax(h.detach()[bag == b], 0) for b in range(3)])
        order = torch.cat([torch.nonzero(bag == b).flatten() for b in range(3)])
        assert torch.allclose(h.grad[order].float(), weights.float(), atol=1e-5)
    if how == "geometric":  # d (log n + mean h) / d h_l = 1 / n
        sizes = torch.bincount(bag).double()
        assert torch.allclose(h.grad, 1 / sizes[bag], atol=1e-6)


def test_patient_bags_score_lesions_then_aggregate():
    torch.manual_seed(0)
    model = SurvivalModel("multimodal", "resnet18", n_clinical=3, n_aux=2).eval()
    images, clinical = torch.rand(5, 2, 32, 32) * 10, torch.randn(2, 3)
    bag = torch.tensor([0, 1, 0, 1, 1])
    with torch.no_grad():
        patient, aux = model.forward_bags(images, bag, 2, clinical, "sum")
        lesion, aux_lesion = model.forward_with_aux(images, clinical[bag])
    assert aux.shape == (5, 2) and torch.allclose(aux, aux_lesion)
    expected = [torch.logsumexp(lesion[bag == b], 0) for b in range(2)]
    assert torch.allclose(patient, torch.stack(expected), atol=1e-5)


def test_lesion_inputs_add_a_linear_term_to_each_lesion_before_aggregation():
    torch.manual_seed(0)
    model = SurvivalModel("multimodal", "resnet18", n_clinical=3, n_lesion_inputs=2).eval()
    images, clinical, z = torch.rand(5, 2, 32, 32) * 10, torch.randn(2, 3), torch.randn(5, 2)
    bag = torch.tensor([0, 1, 0, 1, 1])
    with torch.no_grad():
        assert torch.allclose(model(images, clinical[bag], z), model.lesion_linear(z)[:, 0])  # untrained: the term alone
        model.lesion_linear.weight.copy_(torch.tensor([[0.7, -0.2]]))
        model.head[-1].bias.fill_(0.3)  # a network part that is not 0
        lesion = model(images, clinical[bag], z)
        patient, _ = model.forward_bags(images, bag, 2, clinical, "sum", lesion_inputs=z)
    assert torch.allclose(lesion, 0.3 + z @ torch.tensor([0.7, -0.2]), atol=1e-6)
    assert torch.allclose(patient, torch.stack([torch.logsumexp(lesion[bag == b], 0) for b in range(2)]), atol=1e-5)
    with pytest.raises(ValueError, match="measured lesion inputs"):
        model(images, clinical[bag])
    with pytest.raises(InputError, match="not clinical, not attention"):
        SurvivalModel("imaging", "resnet18", attention=True, n_lesion_inputs=2)


def test_auxiliary_loss_is_the_mse_over_known_targets():
    pred = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    targets = torch.tensor([[3.0, float("nan")], [1.0, float("nan")]])
    assert auxiliary_loss(pred, targets).item() == pytest.approx((4.0 + 1.0) / 2)
    assert auxiliary_loss(None, targets) is None


def test_history_losses_are_patient_level_beside_the_null_model():
    data, val = _tiny_data(16, seed=1), _tiny_data(8, seed=2)
    torch.manual_seed(0)
    model = SurvivalModel("imaging", "resnet18")
    result = fit(model, data, val, TrainConfig(epochs=2, batch_size=4, progress=False), seed=0)
    last = result.history.iloc[-1]
    assert result.best_epoch == 1  # selection "last": the final epoch's weights are kept
    risk, _ = predict(model, data)  # the kept (final) weights, scored per patient
    loss, null = patient_loss(risk, data)
    assert last["train_loss"] == pytest.approx(loss) and last["train_null_loss"] == pytest.approx(null)
    time, event = data.time.double(), data.event
    assert null == pytest.approx(float(neg_partial_log_likelihood(torch.zeros(16, dtype=torch.float64), time, event)))
    # the constant-risk loss grows with the risk sets: 16 training vs 8 validation patients
    assert last["train_null_loss"] > last["val_null_loss"]


def test_validation_selection_keeps_the_best_epoch():
    data = _tiny_data(16, seed=1)
    torch.manual_seed(0)
    model = SurvivalModel("imaging", "resnet18")
    config = TrainConfig(epochs=3, batch_size=4, selection="val_loss", patience=3, progress=False)
    result = fit(model, data, _tiny_data(8, seed=2), config, seed=0)
    assert result.best_epoch == int(result.history["val_loss"].idxmin())
    with pytest.raises(ValueError, match="needs validation"):
        fit(model, data, None, config, seed=0)


def test_pretrained_imagenet_stem_adapted_by_averaging(tmp_path):
    from safetensors.torch import save_file

    reference = torchvision.models.resnet18(weights=None)
    save_file(reference.state_dict(), tmp_path / "r18.safetensors")
    torch.save(reference.state_dict(), tmp_path / "r18.pt")
    for name in ("r18.safetensors", "r18.pt"):
        model = SurvivalModel("imaging", "resnet18")
        left = load_pretrained(model, tmp_path / name)
        assert left == []
        conv = model.encoder.net.conv1.weight
        expected = reference.conv1.weight.mean(dim=1, keepdim=True)
        assert torch.equal(conv[:, :1], expected) and torch.equal(conv[:, 1:], expected)
        assert torch.equal(model.encoder.net.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    # With the lesion-mask channel the stem has 3 inputs, as RGB does: still averaged, never RGB -> PET/CT/mask.
    masked = SurvivalModel("imaging", "resnet18", in_channels=3)
    load_pretrained(masked, tmp_path / "r18.safetensors")
    expected = reference.conv1.weight.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    assert torch.equal(masked.encoder.net.conv1.weight, expected)
    with pytest.raises(InputError, match="not found"):
        load_pretrained(SurvivalModel("imaging", "resnet18"), tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="bad.pt"):
        load_pretrained(SurvivalModel("imaging", "resnet18"), tmp_path / "bad.pt")


@pytest.mark.parametrize("shape", [(2, 16, 16), (3, 2, 16, 16), (2, 8, 8, 8), (3, 3, 16, 16), (3, 8, 8, 8)])
def test_augmentation_batched_seeded_and_geometry_preserving(shape):
    x = torch.rand(6, *shape) * 10
    a = augment_batch(x, torch.Generator().manual_seed(1))
    b = augment_batch(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, augment_batch(x, torch.Generator().manual_seed(2)))
    # with no rotation/shift/jitter left, the transform is a pure flip: values are permuted exactly
    pure = augment_batch(x, torch.Generator().manual_seed(3), max_rotation_deg=0, max_shift=0,
                         pet_log_scale_sd=0, ct_shift_sd_hu=0)
    for i in range(6):
        spatial = tuple(range(-len(shape) + (2 if len(shape) == 4 and shape[1] <= 3 else 1), 0))
        candidates = [x[i]]
        for k in range(1, 1 << len(spatial)):
            dims = [d for j, d in enumerate(spatial) if k >> j & 1]
            candidates.append(x[i].flip(dims))
        assert any(torch.allclose(pure[i], c, atol=1e-5) for c in candidates)


@pytest.mark.parametrize("shape", [(3, 16, 16), (3, 3, 16, 16), (3, 8, 8, 8)])
def test_augmentation_moves_the_lesion_mask_with_the_image_and_never_jitters_it(shape):
    x = torch.rand(6, *shape) * 10
    views = len(shape) == 4 and shape[1] == 3
    channel = 1 if views else 0
    x.select(channel + 1, 2).copy_((torch.rand_like(x.select(channel + 1, 2)) < 0.3).float())
    jitter_only = augment_batch(x, torch.Generator().manual_seed(4), max_rotation_deg=0, max_shift=0,
                                pet_log_scale_sd=0.5, ct_shift_sd_hu=50, views=views)
    pet, mask = jitter_only.select(channel + 1, 0), jitter_only.select(channel + 1, 2)
    # Flips permute the voxels: the mask keeps its 0s and 1s (up to resampling round-off) and as
    # many 1s; PET is rescaled.
    assert torch.allclose(mask, mask.round(), atol=1e-5)
    dims = tuple(range(1, mask.ndim))
    assert torch.equal(mask.round().sum(dim=dims), x.select(channel + 1, 2).sum(dim=dims))
    assert not torch.allclose(pet.sum(), x.select(channel + 1, 0).sum())


def test_concepts_head_scores_a_lesion_linearly_from_its_auxiliary_predictions():
    torch.manual_seed(0)
    model = SurvivalModel("multimodal", "resnet18", n_clinical=3, n_aux=5, head="concepts").eval()
    bags, patient_clinical = torch.tensor([0, 0, 1, 1]), torch.randn(2, 3)
    images, clinical = torch.rand(4, 2, 32, 32) * 10, patient_clinical[bags]
    log_hazard, aux = model.forward_with_aux(images, clinical)
    expected = torch.cat([aux, clinical], dim=1) @ model.head.weight.T + model.head.bias
    assert aux.shape == (4, 5) and torch.allclose(log_hazard, expected.squeeze(1), atol=1e-6)
    # Patient bags score the same lesions the same way before aggregation.
    risk, _ = model.forward_bags(images, bags, 2, patient_clinical, aggregation="sum")
    assert torch.allclose(risk, segment_aggregate(log_hazard, bags, 2, "sum"), atol=1e-5)
    with pytest.raises(InputError, match="needs an image model with auxiliary targets"):
        SurvivalModel("imaging", "resnet18", head="concepts")
    with pytest.raises(InputError, match="unknown risk head"):
        SurvivalModel("imaging", "resnet18", n_aux=2, head="linear")


def _tiny_data(n_patients=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    lesion_patient = torch.arange(n_patients).repeat_interleave(2)
    return SurvivalData(time=torch.rand(n_patients, generator=g) * 20 + 1,
                        event=(torch.rand(n_patients, generator=g) < 0.6).long(),
                        clinical=torch.randn(n_patients, 4, generator=g),
                        images=torch.rand(2 * n_patients, 2, 16, 16, generator=g) * 10,
                        lesion_patient=lesion_patient)


@pytest.mark.parametrize("modality,attention", [("imaging", False), ("multimodal", True), ("clinical", False)])
def test_fit_is_deterministic_on_cpu(modality, attention):
    data = _tiny_data()
    if modality == "imaging":  # an imaging model refuses clinical features
        data = dataclasses.replace(data, clinical=None)
    config = TrainConfig(epochs=2, batch_size=8, progress=False)
    outs = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            torch.manual_seed(123)  # model init
            model = SurvivalModel(modality, "resnet18", n_clinical=4, attention=attention)
            result = fit(model, data, data, config, seed=7)
            outs.append((predict(model, data)[0], result.history))
    finally:
        torch.use_deterministic_algorithms(False)
    assert np.array_equal(outs[0][0], outs[1][0])
    pd.testing.assert_frame_equal(outs[0][1], outs[1][1])
    assert np.isfinite(outs[0][0]).all() and len(outs[0][0]) == data.n_patients


@pytest.mark.parametrize("stem,side", [("standard", 6), ("no-maxpool", 12)])
def test_stem_sets_the_resolution_of_the_first_residual_stage(stem, side):
    """24 x 24 planes (the quick profile's 48 mm / 2 mm): a quarter of the side with torchvision's
    stem, half without its max-pool -- on every plane of the orthogonal view."""
    encoder = ImageEncoder("resnet18", "orthogonal", stem=stem)
    seen = []
    encoder.net.layer1.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    assert encoder(torch.zeros(2, 3, 2, 24, 24)).shape == (2, 512)
    assert seen == [torch.Size([6, 64, side, side])]


def test_stem_refused_where_it_has_no_meaning():
    with pytest.raises(InputError, match="unknown stem"):
        ImageEncoder("resnet18", stem="cifar")
    with pytest.raises(InputError, match="r3d_18's stem has no max-pool"):
        ImageEncoder("r3d_18", stem="no-maxpool")


def test_image_encoder_rejects_unknown_backbone():
    with pytest.raises(InputError, match="unknown backbone"):
        ImageEncoder("vgg16")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_cuda_graph_step_matches_eager_step():
    """The replayed graph computes the same loss and gradients as the eager step on new data.

    Parameters after several AdamW steps are not compared: Adam's first updates are about +-lr
    whatever the gradient's size, so float-level differences flip near-zero updates."""
    from psma_lib.train import Trainer

    data = _tiny_data(n_patients=32).to(torch.device("cuda"))
    losses, grads = {}, {}
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, False
    try:
        for graph in (True, False):
            torch.manual_seed(0)
            model = SurvivalModel("imaging", "resnet18", dropout=0.0).cuda()
            config = TrainConfig(batch_size=16, unit="lesion", augment=False, bf16=False, cuda_graph=graph,
                                 progress=False)
            trainer = Trainer(model, data, config, seed=3)
            assert (trainer.graphed is not None) == graph, trainer.notes
            batches = trainer.epoch_batches()
            losses[graph] = [float(trainer.step(batches[0]))]
            grads[graph] = torch.cat([p.grad.flatten() for p in model.parameters()])
            losses[graph] += [float(trainer.step(idx)) for idx in batches[1:3]]
    finally:
        torch.backends.cudnn.allow_tf32 = True
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-5)
    assert torch.allclose(grads[True], grads[False], rtol=1e-3, atol=1e-6)
    assert losses[True] == pytest.approx(losses[False], rel=1e-2)
    assert len(set(losses[True])) == 3  # new data and updated weights at every replay


@needs_cuda
def test_fit_on_cuda_bf16_graph_gives_finite_risks():
    data = _tiny_data(n_patients=40)
    model = SurvivalModel("multimodal", "resnet18", n_clinical=4).cuda()
    result = fit(model, data, data, TrainConfig(epochs=2, batch_size=16, progress=False), seed=1)
    assert result.notes == []  # no fallback from the CUDA graph
    risk, lesion = predict(model, data.to(torch.device("cuda")), bf16=True)
    assert np.isfinite(risk).all() and np.isfinite(lesion).all()
