"""FID InceptionV3 extractor: weights loading (paths, file:// URLs into a cache, checksum and
state-dict errors), and parity with torch-fidelity 0.4.0's `FeatureExtractorInceptionV3` on the
same weights file: the TF1 resize, pool features and unbiased logits, and FID / KID / IS values.

The weights are made here (the real 2015-12-05 file is 95 MB behind a download): the reference
architecture with random convolutions, BatchNorm statistics calibrated on the test images so
that activations keep unit scale through the ~95 layers, and a classifier orthogonal to the mean
feature so the logits differ between images (otherwise every softmax is the same and IS is 1).
"""
import functools
import hashlib
import http.server
import shutil
import threading
import warnings

import numpy as np
import pytest
import torch

from dgm_scale.metrics.extractors import build_extractor
from dgm_scale.metrics.fid import fid_from_features
from dgm_scale.metrics.inception import (
    InceptionExtractor,
    InceptionWeightsError,
    load_inception,
    resize_bilinear_tf1,
)
from dgm_scale.metrics.inception_net import FIDInceptionV3
from dgm_scale.metrics.inception_score import inception_score
from dgm_scale.metrics.kid import kid


def smooth_images(n: int, channels: int, height: int, width: int, seed: int, brightness: float = 0.0) -> torch.Tensor:
    """uint8 [n, channels, height, width]: blurry blobs plus noise, so resized images have structure."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    x = x * 0.8 + 0.2 * torch.rand(n, channels, height, width, generator=g) + brightness
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> the network input, as torch-fidelity prepares it (for calibration only)."""
    x = resize_bilinear_tf1(images.float().expand(-1, 3, -1, -1), (299, 299))
    return (x - 128) / 128


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_with_hash_name(state: dict, folder, stem: str = "inception-test"):
    """Save `state` as folder/<stem>-<sha256[:8]>.pth, the torch.hub naming of the real file."""
    scratch = folder / f"{stem}.tmp"
    torch.save(state, scratch)
    path = folder / f"{stem}-{sha256_of(scratch)[:8]}.pth"
    scratch.rename(path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    net = FIDInceptionV3()
    calibration = torch.cat([preprocess(smooth_images(2, 3, 32, 32, 100)),
                             preprocess(smooth_images(2, 1, 16, 16, 101, brightness=0.2))])
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # running statistics = this batch's statistics
    with torch.no_grad():
        features = net.train().pool_features(calibration)  # ~ the eval output: same statistics
        net.eval()
        mean = features.mean(0)
        fc = torch.randn(1008, 2048)
        fc -= torch.outer(fc @ mean, mean) / (mean @ mean)  # logits depend on how images differ
        fc *= 3 / (features @ fc.T).std()
        net.fc.weight.copy_(fc)
        net.fc.bias.normal_()  # unused by 'logits_unbiased': shows that the bias is left out
    return save_with_hash_name(net.state_dict(), tmp_path_factory.mktemp("weights"))


# ------------------------------------------------------------------------------- loading
def test_load_from_a_path_checks_the_hash_and_loads_every_tensor(weights):
    net = load_inception(str(weights), cache_dir="unused")
    assert net.weights_sha256 == sha256_of(weights) and weights.name.endswith(f"-{net.weights_sha256[:8]}.pth")
    saved = torch.load(weights, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_file_url_is_downloaded_into_the_cache_once_and_reused_offline(weights, tmp_path):
    source = tmp_path / "server" / weights.name
    source.parent.mkdir()
    shutil.copy(weights, source)
    cache = tmp_path / "cache"
    net = load_inception(source.as_uri(), cache)
    assert (cache / weights.name).read_bytes() == weights.read_bytes()
    assert [p.name for p in cache.iterdir()] == [weights.name]  # no temporary file left behind
    source.unlink()  # the "server" is gone: the cached copy must be used without fetching
    again = load_inception(source.as_uri(), cache)
    assert again.weights_sha256 == net.weights_sha256 == sha256_of(weights)


def test_http_url_is_downloaded_from_a_local_server(weights, tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(weights.parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{weights.name}"
        net = load_inception(url, tmp_path / "cache")
        with pytest.raises(InceptionWeightsError, match=f"could not download .*{server.server_address[1]}/absent"):
            load_inception(url.replace("inception-test", "absent"), tmp_path / "cache")
    finally:
        server.shutdown()
        server.server_close()
    assert net.weights_sha256 == sha256_of(weights) and (tmp_path / "cache" / weights.name).exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [weights.name]


def test_default_weights_are_torch_fidelitys_release(tfid, monkeypatch, tmp_path):
    from dgm_scale.metrics import inception

    assert inception.INCEPTION_URL == tfid["feature_extractor_inceptionv3"].URL_INCEPTION_V3
    requested = []

    def offline(url, cache_dir):
        requested.append(url)
        raise InceptionWeightsError("offline")

    monkeypatch.setattr(inception, "_download", offline)
    with pytest.raises(InceptionWeightsError, match="offline"):
        load_inception(None, tmp_path)
    assert requested == [inception.INCEPTION_URL]


def test_build_extractor_spec_names_weights_and_key_carries_their_hash(weights):
    extractor = build_extractor(f"inception:{weights}", (3, 32, 32), "unused")
    assert isinstance(extractor, InceptionExtractor)
    assert (extractor.name, extractor.feature_dim, extractor.has_logits) == ("inception-v3-compat", 2048, True)
    assert extractor.key()["weights_sha256"] == sha256_of(weights)


def test_wrong_hash_is_refused_by_path_and_by_url_without_caching(weights, tmp_path):
    renamed = tmp_path / "inception-test-deadbeef.pth"
    shutil.copy(weights, renamed)
    with pytest.raises(InceptionWeightsError, match="inception-test-deadbeef.pth.*deadbeef"):
        load_inception(str(renamed), tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(InceptionWeightsError, match="file://.*deadbeef"):
        load_inception(renamed.as_uri(), cache)
    assert not list(cache.iterdir())  # neither the bad file nor a partial one


def test_truncated_missing_and_unreadable_files_give_one_line_errors(weights, tmp_path):
    truncated = tmp_path / weights.name
    truncated.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(InceptionWeightsError, match="sha256") as error:
        load_inception(str(truncated), tmp_path)
    assert str(truncated) in str(error.value) and "\n" not in str(error.value)
    unnamed = tmp_path / "my-weights.pth"  # no hash in the name: the torch.load failure is reported
    unnamed.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(InceptionWeightsError, match="my-weights.pth: not a readable torch file") as error:
        load_inception(str(unnamed), tmp_path)
    assert "\n" not in str(error.value)
    with pytest.raises(InceptionWeightsError, match="absent.pth: no such file"):
        load_inception(str(tmp_path / "absent.pth"), tmp_path)
    with pytest.raises(InceptionWeightsError, match="could not download .*absent-0123abcd.pth"):
        load_inception((tmp_path / "absent-0123abcd.pth").as_uri(), tmp_path / "cache")


def test_state_dict_that_does_not_fit_names_the_first_bad_key(weights, tmp_path):
    state = torch.load(weights, weights_only=True)
    missing = dict(state)
    del missing["Mixed_6b.branch1x1.conv.weight"]
    path = save_with_hash_name(missing, tmp_path, "missing")
    with pytest.raises(InceptionWeightsError, match=r"missing key 'Mixed_6b.branch1x1.conv.weight' \(1 missing"):
        load_inception(str(path), tmp_path)
    path = save_with_hash_name({**state, "aux.weight": torch.zeros(1)}, tmp_path, "extra")
    with pytest.raises(InceptionWeightsError, match="unexpected key 'aux.weight'"):
        load_inception(str(path), tmp_path)
    path = save_with_hash_name({**state, "fc.weight": torch.zeros(1000, 2048)}, tmp_path, "shape")
    with pytest.raises(InceptionWeightsError, match=r"'fc.weight' has shape \(1000, 2048\)"):
        load_inception(str(path), tmp_path)


# -------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (2, 3, 32, 32), (1, 1, 24, 40), (1, 3, 299, 299),
                                   (1, 3, 320, 300)])
def test_resize_is_bit_identical_to_torch_fidelitys(tfid, shape):
    x = smooth_images(*shape, seed=sum(shape)).float()
    theirs = tfid["interpolate_compat_tensorflow"].interpolate_bilinear_2d_like_tensorflow1x(
        x, size=(299, 299), align_corners=False)
    assert torch.equal(resize_bilinear_tf1(x, (299, 299)), theirs)
    double = x.double()  # their float64 path: positions and weights follow the input dtype
    assert torch.equal(resize_bilinear_tf1(double, (299, 299)),
                       tfid["interpolate_compat_tensorflow"].interpolate_bilinear_2d_like_tensorflow1x(
                           double, size=(299, 299), align_corners=False))


@pytest.fixture(scope="module")
def reference(tfid, weights):
    return tfid["feature_extractor_inceptionv3"].FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights))


@pytest.fixture(scope="module")
def extracted(reference, weights):
    """Features and logits of two image sets (RGB 32x32, grey 16x16), ours and torch-fidelity's."""
    ours = InceptionExtractor(load_inception(str(weights), "unused"))
    sets = {"rgb32": smooth_images(6, 3, 32, 32, 1), "grey16": smooth_images(6, 1, 16, 16, 2, brightness=0.15)}
    out = {}
    with torch.no_grad():
        for name, images in sets.items():
            out[name] = {"ours": ours(to_model_space(images)),  # model space -> to_uint8 -> grey to RGB
                         "theirs": reference(images.expand(-1, 3, -1, -1).contiguous())}
    return out


@pytest.fixture(scope="module")
def float64_truth(weights):
    """The first 2 images of each set through the same graph in float64: what float32 approximates.

    Our unfolded network (bit-identical to torch-fidelity's in float32, see below) run in float64;
    torch-fidelity's own `feature_extractor_internal_dtype="float64"` maps to float32 in 0.4.0.
    """
    net = load_inception(str(weights), "unused").double()
    sets = {"rgb32": smooth_images(6, 3, 32, 32, 1)[:2], "grey16": smooth_images(6, 1, 16, 16, 2, brightness=0.15)[:2]}
    with torch.no_grad():
        return {name: net((resize_bilinear_tf1(images.double().expand(-1, 3, -1, -1), (299, 299)) - 128) / 128)
                for name, images in sets.items()}


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", ["rgb32", "grey16"])
def test_features_and_unbiased_logits_match_torch_fidelity(extracted, float64_truth, name):
    (features, logits), (their_features, their_logits) = extracted[name]["ours"], extracted[name]["theirs"]
    assert features.shape == (6, 2048) and logits.shape == (6, 1008)
    assert features.dtype == logits.dtype == torch.float32
    # Folded BatchNorms and NHWC kernels round differently; after ~95 float32 layers that is
    # ~1e-5..1e-4 of the largest value, the size of torch-fidelity's own float32 error: measured
    # against the float64 graph, ours is as accurate as theirs (within a factor of 3).
    assert relative_difference(features, their_features) < 3e-4
    assert relative_difference(logits, their_logits) < 3e-4
    truth_features, truth_logits = (t.float() for t in float64_truth[name])
    for ours, theirs, truth in ((features[:2], their_features[:2], truth_features),
                                (logits[:2], their_logits[:2], truth_logits)):
        our_error, their_error = relative_difference(ours, truth), relative_difference(theirs, truth)
        assert our_error < 3 * their_error + 1e-6, (our_error, their_error)
    # The features must be worth comparing: they differ between images well beyond that tolerance.
    assert (their_features.std(0).max() / their_features.abs().max()).item() > 1e-2


def test_unfolded_nchw_network_is_bit_identical_to_torch_fidelity(reference, weights):
    exact = InceptionExtractor(load_inception(str(weights), "unused"), fold_bn=False, channels_last=False)
    images = smooth_images(2, 3, 24, 40, 3)
    with torch.no_grad():
        theirs = reference(images)
    ours = exact.extract_uint8(images)
    assert torch.equal(ours.features, theirs[0]) and torch.equal(ours.logits, theirs[1])


def test_fid_kid_is_from_our_features_match_torch_fidelity(tfid, extracted):
    real, fake = extracted["rgb32"], extracted["grey16"]
    # FID at 2048 dimensions costs ~45 s of sqrtm/eig on 2 cores, and 6 images give a rank-5
    # covariance; so FID here uses the 5 highest-variance dimensions (full-rank covariances);
    # the full-size comparison is test_fid_on_all_2048_dimensions_matches (marked slow).
    dims = torch.cat([real["theirs"][0], fake["theirs"][0]]).var(0).topk(5).indices
    m = tfid["metric_fid"]
    theirs = m.fid_statistics_to_metric(m.fid_features_to_statistics(real["theirs"][0][:, dims]),
                                        m.fid_features_to_statistics(fake["theirs"][0][:, dims]),
                                        verbose=False)["frechet_inception_distance"]
    ours = fid_from_features(real["ours"].features[:, dims], fake["ours"].features[:, dims])
    assert theirs > 1e-3 and abs(ours - theirs) / theirs < 1e-3

    their_kid = tfid["metric_kid"].kid_features_to_metric(real["theirs"][0], fake["theirs"][0], kid_subsets=20,
                                                          kid_subset_size=5, verbose=False)
    our_kid = kid(real["ours"].features, fake["ours"].features, subsets=20, subset_size=5)
    assert their_kid["kernel_inception_distance_mean"] > 1e-6
    assert abs(our_kid[0] / their_kid["kernel_inception_distance_mean"] - 1) < 1e-3
    assert abs(our_kid[1] / their_kid["kernel_inception_distance_std"] - 1) < 1e-3

    logits = torch.cat([real["ours"].logits, fake["ours"].logits])
    their_logits = torch.cat([real["theirs"][1], fake["theirs"][1]])
    their_is = tfid["metric_isc"].isc_features_to_metric(their_logits, splits=2, shuffle=False)
    our_is = inception_score(logits, splits=2)
    assert their_is["inception_score_mean"] > 1.5  # the predictions differ between images
    assert abs(our_is[0] / their_is["inception_score_mean"] - 1) < 1e-3
    assert abs(our_is[1] - their_is["inception_score_std"]) < 1e-3 * their_is["inception_score_mean"]


@pytest.mark.slow
def test_fid_on_all_2048_dimensions_matches(tfid, extracted):
    real, fake = extracted["rgb32"], extracted["grey16"]
    m = tfid["metric_fid"]
    theirs = m.fid_statistics_to_metric(m.fid_features_to_statistics(real["theirs"][0]),
                                        m.fid_features_to_statistics(fake["theirs"][0]),
                                        verbose=False)["frechet_inception_distance"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rank-5 covariances: the eigenvalue fallback
        ours = fid_from_features(real["ours"].features, fake["ours"].features)
    assert np.isfinite(ours) and abs(ours - theirs) / theirs < 1e-3


def test_extract_rejects_other_shapes_and_dtypes(weights):
    extractor = InceptionExtractor(load_inception(str(weights), "unused"))
    with pytest.raises(ValueError, match="1 or 3"):
        extractor(torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="uint8"):
        extractor.extract_uint8(torch.zeros(1, 3, 8, 8))
