"""Speed options give the default's output: grid_cache (GridCachedWarp) in the network and the loss; the
benchmark's network override files build the configs' network."""

import torch
from monai.networks.blocks import Warp

from scripts.networks.blocks import GridCachedWarp
from scripts.networks.registration import RegistrationNet


def _field(n, shape, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, 3, *shape, generator=g)


def test_grid_cached_warp_matches_monai_warp_and_refreshes_its_grid():
    torch.manual_seed(0)
    cached = GridCachedWarp(mode="bilinear", padding_mode="border")
    reference = Warp(mode="bilinear", padding_mode="border")
    # several voxels of displacement, two batch sizes and two grids: the cache must follow the shape
    for n, shape, seed in [(1, (9, 8, 7), 1), (2, (9, 8, 7), 2), (1, (6, 10, 5), 3), (1, (9, 8, 7), 4)]:
        image = torch.rand(n, 2, *shape, generator=torch.Generator().manual_seed(seed + 10))
        ddf = _field(n, shape, 2.0, seed)
        assert torch.allclose(cached(image, ddf), reference(image, ddf), atol=1e-6)
        assert cached.ref_grid.shape == (1, 3, *shape)
    # the grid is the identity: a zero field returns the image unchanged
    image = torch.rand(1, 1, 5, 6, 7, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(cached(image, torch.zeros(1, 3, 5, 6, 7)), image, atol=1e-6)


def test_grid_cache_switch_gives_the_default_output_and_gradients():
    torch.manual_seed(0)
    default = RegistrationNet(lstm="none", flow_init_std=2.0)
    fast = RegistrationNet(lstm="none", flow_init_std=2.0, grid_cache=True)
    fast.load_state_dict(default.state_dict())  # the switch adds no parameters or buffers
    assert fast.integrate.warp_layer.cache and not default.integrate.warp_layer.cache  # the switch is the cache
    image = torch.rand(1, 2, 16, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():  # first call under inference mode, then with autograd
        assert torch.allclose(fast(image), default(image), atol=1e-5)
    out_default, out_fast = default(image), fast(image)
    assert out_default.abs().max() > 0.5  # a field large enough to exercise the sampling
    assert torch.allclose(out_fast, out_default, atol=1e-5)
    out_default.square().sum().backward()
    out_fast.square().sum().backward()
    for (name, p_default), p_fast in zip(default.named_parameters(), fast.parameters()):
        assert torch.allclose(p_fast.grad, p_default.grad, rtol=1e-4, atol=1e-7), name


def test_benchmark_variant_file_builds_the_network_of_the_config():
    """benchmarks/speed.py times ``configs/cpu_net.json`` as the bundle config builds it (same layers)."""
    import sys
    from pathlib import Path

    from monai.bundle import ConfigParser

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    from speed import variant_kwargs, variant_name

    parser = ConfigParser()
    parser.read_config([str(root / "configs/inference.json"), str(root / "configs/cpu_net.json")])
    parser["spatial_size"] = [32, 32, 32]
    configured = parser.get_parsed_content("network_def")
    timed = RegistrationNet(**variant_kwargs("configs/cpu_net.json"), spatial_size=[32, 32, 32])
    shapes = {k: v.shape for k, v in configured.state_dict().items()}
    assert shapes == {k: v.shape for k, v in timed.state_dict().items()}
    assert configured.flow.in_channels == 8
    assert any(m.dilation[0] > 1 for m in configured.modules() if isinstance(m, torch.nn.Conv3d))  # dilated MSFA
    assert variant_name("configs/cpu_net.json") == "cpu_net" and variant_kwargs("paper") == {"msfa_mode": "paper"}
    # the default network is larger: the override file is applied, not ignored
    assert sum(p.numel() for p in RegistrationNet().parameters()) > sum(p.numel() for p in timed.parameters())


def test_loss_grid_cache_gives_the_default_loss_and_gradients():
    """RegistrationLoss(grid_cache=True) warps with GridCachedWarp; value and ddf gradient as MONAI's Warp."""
    from scripts.training.losses import RegistrationLoss

    g = torch.Generator().manual_seed(3)
    shape = (12, 10, 20)
    moving, fixed = torch.rand(2, 1, *shape, generator=g), torch.rand(2, 1, *shape, generator=g)
    labels = torch.zeros(2, 2, *shape)
    labels[:, :, 3:9, 2:8, 4:16] = 1.0
    fixed_labels = torch.roll(labels, 1, dims=2)
    results = []
    for grid_cache in (False, True):
        loss = RegistrationLoss(chunks=4, grid_cache=grid_cache)
        assert isinstance(loss.warp, GridCachedWarp) == grid_cache
        ddf = _field(2, shape, 1.5, seed=7).requires_grad_(True)
        out = loss(ddf, moving, fixed, labels, fixed_labels)
        total = out["reg"].sum() + out["smooth"].sum()
        total.backward()
        results.append((total.detach(), ddf.grad))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
    assert results[0][1].abs().max() > 0  # the warp is differentiated, not bypassed


def test_benchmark_runs_file_variants_and_onnx_rows(tmp_path):
    """benchmarks/speed.py end to end on a 32^3 grid (a smoke run of the command, no time asserted): the
    override-file variant, its ONNX Runtime row and its coarse-grid row are timed, and the ONNX field matches
    PyTorch's fp32 one."""
    import re
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from speed import main, variant_kwargs

    torch.set_num_threads(1)
    out = tmp_path / "speed.txt"
    main(
        grid="32,32,32",
        variants="configs/cpu_net.json",
        amp="fp32",
        train=False,
        voxelmorph=False,
        ants=False,
        onnx=True,
        net_grid="16,16,16",
        warmup=0,
        repeats=1,
        threads=1,
        out=str(out),
    )
    report = out.read_text()
    params = sum(p.numel() for p in RegistrationNet(**variant_kwargs("configs/cpu_net.json")).parameters())
    assert "checkpoint cpu_net: " in report and f"({params:,} parameters" in report
    table = report.split("reference row")[1]
    assert re.search(r"^ours infer cpu_net fp32 +\d", table, re.M)
    row = re.search(r"^ours infer cpu_net onnxruntime fp32 .*ddf rel\.diff vs fp32 ([0-9.e+-]+)", table, re.M)
    assert row and float(row.group(1)) < 1e-4
    assert re.search(r"^ours infer cpu_net fp32 net 16x16x16 +\d", table, re.M)  # the coarse-grid row


def test_resize_field_scales_voxel_displacements_by_the_grid_ratio():
    """benchmarks/speed.py's coarse-grid rows: a field on a coarse grid, brought to the image grid, moves the same
    physical distance (voxel displacements times the voxel ratio per axis), and a warp with it shifts the image."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from speed import resize_field

    coarse = torch.zeros(1, 3, 8, 6, 5)
    coarse[:, 0], coarse[:, 1], coarse[:, 2] = 1.0, -0.5, 0.25  # constant, in coarse voxels
    fine = resize_field(coarse, (16, 18, 20))  # voxel ratios 2, 3, 4
    assert fine.shape == (1, 3, 16, 18, 20)
    for axis, value in enumerate((2.0, -1.5, 1.0)):
        assert torch.allclose(fine[:, axis], torch.full_like(fine[:, axis], value))
    # warping a ramp along axis 0 with the resized field reads 2 voxels further on, away from the border
    ramp = torch.arange(16.0).view(1, 1, 16, 1, 1).expand(1, 1, 16, 18, 20).contiguous()
    warped = GridCachedWarp(mode="bilinear", padding_mode="border")(ramp, fine)
    assert torch.allclose(warped[0, 0, :12], ramp[0, 0, 2:14], atol=1e-4)
