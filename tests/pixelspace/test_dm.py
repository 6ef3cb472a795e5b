"""DM: the batched loss equals the reference's per-class loop; the loss decreases; the BN branch runs."""

from __future__ import annotations

import torch

from distill.methods.base import RunContext
from distill.methods.registry import get_method, parse_params
from distill.nets import build_network
from pixelspace.dm import dm_loss_naive, matching_loss
from pixelspace.realpool import RealPool


def test_batched_dm_loss_equals_naive_per_class_loop(mnist):
    ctx = RunContext(dataset=mnist, ipc=3, seed=0, max_per_class=20)
    gen = torch.Generator().manual_seed(0)
    real = RealPool(ctx).sample_all(12, gen)
    syn = torch.randn(10, 3, 1, 28, 28, generator=gen)
    net = build_network("convnet", 1, 10, 28, seed=3)
    for p in net.parameters():
        p.requires_grad_(False)
    syn_a, syn_b = syn.clone().requires_grad_(True), syn.clone().requires_grad_(True)
    batched = matching_loss(net, real, syn_a, real_chunk=50)  # chunks split classes: still identical
    naive = dm_loss_naive(net, real, syn_b)
    torch.testing.assert_close(batched, naive, rtol=1e-5, atol=1e-5)
    batched.backward()
    naive.backward()
    torch.testing.assert_close(syn_a.grad, syn_b.grad, rtol=1e-4, atol=1e-7)
    # bf16 real side: the target means move far less than the loss itself
    bf16 = matching_loss(net, real, syn.clone().requires_grad_(True), real_dtype=torch.bfloat16)
    assert abs(float(bf16.detach()) - float(naive.detach())) / float(naive.detach()) < 0.01


def test_dm_loss_decreases_on_small_real_slice(mnist):
    cls = get_method("dm")
    ctx = RunContext(dataset=mnist, ipc=2, seed=0, max_per_class=20)
    out = cls().run(ctx, parse_params(cls, {"iterations": 8, "batch_real": 16, "init": "noise", "model": "convnet-w32"}))
    curve = out.extras["loss_curve"]
    assert float(curve[-3:].mean()) < 0.5 * float(curve[:2].mean())
    assert out.images.shape == (20, 1, 28, 28)
    assert out.metrics["lr_img"] == 1.0 and out.metrics["dsa_strategy"] == "color_crop_cutout_scale_rotate"


def test_dm_batchnorm_branch_and_real_init_pixel_scale(mnist):
    cls = get_method("dm")
    ctx = RunContext(dataset=mnist, ipc=1, seed=0, max_per_class=20)
    out = cls().run(ctx, parse_params(cls, {"iterations": 2, "batch_real": 8, "model": "convnet-bn", "lr_img": 1e-6}))
    # init real + a negligible lr: the archive holds (almost) the real pixels in [0, 1]
    assert float(out.images.min()) > -0.01 and float(out.images.max()) < 1.01
    assert torch.isfinite(out.extras["loss_curve"]).all()


def test_cell_mean_loss_is_each_image_against_its_own_cells_mean():
    """The cell-matched term: image k of a class against the mean embedding of the real images of cell k,
    weighted by the cell's mass; a cell absent from the batch and rows in no cell (-1) add nothing; with one cell
    per class holding every image it is DM's class-mean loss."""
    from pixelspace.dm import cell_mean_loss, class_mean_loss

    gen = torch.Generator().manual_seed(0)
    real, syn = torch.randn(2, 6, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    cells = torch.tensor([[0, 0, 1, 1, 1, -1], [2, 2, 2, 0, 0, 0]])  # class 0 has no image of cell 2 here
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    expected = (0.5 * ((real[0, :2].mean(0) - syn[0, 0]) ** 2).sum() + 0.3 * ((real[0, 2:5].mean(0) - syn[0, 1]) ** 2).sum()
                + 0.1 * ((real[1, 3:].mean(0) - syn[1, 0]) ** 2).sum() + 0.3 * ((real[1, :3].mean(0) - syn[1, 2]) ** 2).sum())
    torch.testing.assert_close(cell_mean_loss(real, cells, syn, weights), expected)
    one = cell_mean_loss(real, torch.zeros(2, 6, dtype=torch.long), syn[:, :1], torch.ones(2, 1))
    torch.testing.assert_close(one, class_mean_loss(real, syn[:, :1]))


def test_positions_are_the_draws_of_sample_all(mnist):
    """sample_all_with_positions draws what sample_all draws from the same generator, and says which images."""
    pool = RealPool(RunContext(dataset=mnist, ipc=1, seed=0, max_per_class=20))
    plain = pool.sample_all(5, torch.Generator().manual_seed(4))
    images, positions = pool.sample_all_with_positions(5, torch.Generator().manual_seed(4))
    assert torch.equal(plain, images) and positions.shape == (10, 5)
    assert torch.equal(images[3, 2], pool._normalise(pool.images(3, positions[3, 2:3]))[0])


def test_synthetic_side_in_class_groups_is_the_one_pass_result(mnist, monkeypatch):
    """Large sets run the synthetic forward/backward a few classes at a time (each class's loss reaches only its
    own images): the images match the one-pass run, cell-matched terms included; the group size follows the
    activation budget (one class per pass at 128 px and IPC 50 on the CPU's 2 GiB)."""
    import pixelspace.dm as dm
    from distill.data import get_dataset
    from pixelspace.dm import CellTargets, class_groups

    cls = get_method("dm")
    params = parse_params(cls, {"iterations": 3, "batch_real": 8, "init": "real"})
    ctx = RunContext(dataset=mnist, ipc=2, seed=0, max_per_class=20)
    cells = CellTargets(cells=[torch.arange(20) % 2 for _ in range(10)], weights=torch.full((10, 2), 0.5),
                        class_term=True)
    whole = cls().run(ctx, params, cells=cells).images
    monkeypatch.setattr(dm, "synthetic_classes_per_pass", lambda params, ctx: 3)
    grouped = cls().run(RunContext(dataset=mnist, ipc=2, seed=0, max_per_class=20), params, cells=cells).images
    torch.testing.assert_close(grouped, whole, rtol=1e-4, atol=1e-5)
    assert class_groups(10, 3) == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 10)]
    assert class_groups(10, 10) == [slice(0, 10)]
    monkeypatch.undo()
    assert dm.synthetic_classes_per_pass(params, ctx) == 10  # MNIST: every class at once
    big = RunContext(dataset=get_dataset("imagenette@128"), ipc=50, seed=0)
    assert dm.synthetic_classes_per_pass(params, big) == 1


def test_bf16_and_compiled_synthetic_side_keep_the_loss_and_the_images_gradient():
    """syn_precision bf16 (eager or through a compiled RealPass) moves the images as fp32 does: loss within 1%,
    gradient cosine above 0.99; the compiled pass computes what the eager bf16 pass does."""
    from pixelspace.realpass import RealPass, real_embed_pass

    gen = torch.Generator().manual_seed(0)
    real, syn = torch.randn(3, 8, 3, 16, 16, generator=gen), torch.randn(3, 2, 3, 16, 16, generator=gen)
    net = build_network("convnet-w32", 3, 3, 16, seed=1)
    for p in net.parameters():
        p.requires_grad_(False)

    def loss_and_grad(**kwargs) -> tuple[float, torch.Tensor]:
        images = syn.clone().requires_grad_(True)
        loss = matching_loss(net, real, images, **kwargs)
        loss.backward()
        assert images.grad is not None
        return float(loss.detach()), images.grad.flatten()

    fp32, g32 = loss_and_grad()
    for kwargs in ({"syn_dtype": torch.bfloat16},
                   {"syn_embed": RealPass(real_embed_pass(net, torch.bfloat16), compile=True)}):
        loss, grad = loss_and_grad(**kwargs)
        assert abs(loss - fp32) / fp32 < 0.01
        assert float(torch.nn.functional.cosine_similarity(grad, g32, dim=0)) > 0.99


def test_dm_records_the_synthetic_side_arithmetic(mnist):
    cls = get_method("dm")
    ctx = RunContext(dataset=mnist, ipc=1, seed=0, max_per_class=10)
    for precision in ("fp32", "bf16"):
        out = cls().run(ctx, parse_params(cls, {"iterations": 2, "batch_real": 4, "model": "convnet-w16",
                                                "syn_precision": precision}))
        assert out.metrics["syn_precision"] == ("float32" if precision == "fp32" else "bfloat16")


def test_the_synthetic_pass_compiles_where_its_work_repays_it():
    from pixelspace.dm import syn_compile_wanted

    cpu = torch.device("cpu")
    assert syn_compile_wanted("auto", cpu, 200, 100, 64)  # Imagenette IPC 10 at 64 px, oq's 200 iterations
    assert not syn_compile_wanted("auto", cpu, 200, 100, 28)  # MNIST IPC 10 (make demo): eager bf16
    assert not syn_compile_wanted("auto", cpu, 200, 10, 64)  # IPC 1: too little work
    assert not syn_compile_wanted("auto", cpu, 40, 10_000, 64)  # too short, as the real pass
    assert syn_compile_wanted("on", cpu, 1, 1, 8) and not syn_compile_wanted("off", cpu, 10**6, 500, 128)
