#!/usr/bin/env python3
"""PyTorch reference for the GPO module (Group Preference Optimization, Zhao et al.,
ICLR 2024), a TNP-D-style Transformer Neural Process.

This file was written from a prose description of the official model, not copied from
any repository. It exists for three jobs:

* ``export``: build the module with PyTorch's default initialization and a random,
  padded meta-batch, and write fixtures (weights, batch, expected loss) that the Rust
  test ``tests/reference_loss.rs`` checks ``gpo loss`` against. The expected loss is
  computed in float64; the float32 loss is recorded alongside it.
* ``bench``: time the official-style training step (the official collate, forward with
  the per-question softmax written in place one question at a time, backward, Adam step,
  zero_grad) on OpinionQA-shaped batches, for a side-by-side comparison with ``gpo bench``.
* ``flops``: count the official step's matrix-product operations on gpo's batch shapes
  with PyTorch's FlopCounterMode, the cross-check of ``gpo bench step``'s count of them.

The model, as described:

* embedder: Linear(D+1, d) ReLU, (emb_depth-2) x [Linear(d, d) ReLU], Linear(d, d);
* input points: context (x, y), targets (x, 0); context first;
* encoder: nn.TransformerEncoder of post-LN ReLU layers, dropout 0, where every point
  attends only to the (non-padding) context points;
* predictor: Linear(d, ffn) ReLU Linear(ffn, 2) -> (mean, log std) for the targets;
* mean is softmaxed over the options of each target question (``tarqlen``);
* loss: minus the Gaussian log-likelihood of the true option probabilities, with padded
  target slots set to 0, averaged over groups *and* target slots: the mean over
  G x Nt_max, padded slots in the denominator (the official ``GPO.forward`` takes
  ``masked_log_probs.sum(-1).mean()`` over ``[G, Nt, dim_y]``, and the sum is over
  dim_y = 1).

A point is padding iff its x sums to exactly 0. CI has no torch: the committed fixtures
under tests/fixtures/reference/ are what it uses (see tools/reference/README.md).
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

OFFICIAL = dict(d_model=128, emb_depth=4, dim_feedforward=128, nhead=4, num_layers=6)
OFFICIAL_PARAMS_AT_4096 = 1_188_354


class GPO(nn.Module):
    """The GPO / TNP-D module, with parameter names matching the official state_dict."""

    def __init__(self, dim_x, dim_y=1, d_model=128, emb_depth=4, dim_feedforward=128, nhead=4,
                 num_layers=6):
        super().__init__()
        if emb_depth < 2:
            raise ValueError("emb_depth must be at least 2")
        layers = [nn.Linear(dim_x + dim_y, d_model), nn.ReLU()]
        for _ in range(emb_depth - 2):
            layers += [nn.Linear(d_model, d_model), nn.ReLU()]
        layers.append(nn.Linear(d_model, d_model))
        self.embedder = nn.Sequential(*layers)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=0.0,
                                           activation="relu", layer_norm_eps=1e-5,
                                           batch_first=True, norm_first=False)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.predictor = nn.Sequential(nn.Linear(d_model, dim_feedforward), nn.ReLU(),
                                       nn.Linear(dim_feedforward, 2 * dim_y))

    def predict(self, xc, yc, xt):
        """Predictor output for every target point: ``[G, Nt, 2]`` = (mean, raw std)."""
        nc, nt = xc.shape[1], xt.shape[1]
        ctx = torch.cat([xc, yc], dim=-1)
        tgt = torch.cat([xt, torch.zeros(xt.shape[:-1] + (yc.shape[-1],), dtype=xt.dtype)], dim=-1)
        inp = torch.cat([ctx, tgt], dim=1)
        n = nc + nt
        # Every point attends to the context points only.
        mask = torch.full((n, n), float("-inf"), dtype=xc.dtype)
        mask[:, :nc] = 0.0
        pad = torch.cat([xc.sum(-1) == 0, xt.sum(-1) == 0], dim=1)
        # Float key-padding mask of the same type as `mask` (PyTorch merges the two).
        pad = torch.zeros(pad.shape, dtype=xc.dtype).masked_fill(pad, float("-inf"))
        h = self.encoder(self.embedder(inp), mask=mask, src_key_padding_mask=pad)
        return self.predictor(h[:, -nt:])


def segment_softmax(mean, tarqlen):
    """Softmax of ``mean [G, Nt, 1]`` over the options of each target question, as the
    official code does it: a Python loop over groups and question segments. Target
    positions past the last question keep mean 0."""
    g, nt, _ = mean.shape
    rows = []
    for b in range(g):
        pieces, start = [], 0
        for n in tarqlen[b].tolist():
            if n == 0:
                continue
            pieces.append(torch.softmax(mean[b, start:start + n], dim=0))
            start += n
        if start < nt:
            pieces.append(torch.zeros_like(mean[b, start:]))
        rows.append(torch.cat(pieces, dim=0))
    return torch.stack(rows, dim=0)


def gpo_loss(model, xc, yc, xt, yt, tarqlen):
    out = model.predict(xc, yc, xt)
    mean, raw = torch.chunk(out, 2, dim=-1)
    std = torch.exp(raw)
    mean = segment_softmax(mean, tarqlen)
    log_probs = torch.distributions.Normal(mean, std).log_prob(yt)
    real_len = (xt.sum(-1) != 0).sum(-1)  # non-padding target points per group
    keep = torch.arange(xt.shape[1])[None, :] < real_len[:, None]
    masked = torch.where(keep[..., None], log_probs, torch.zeros_like(log_probs))
    # Sum over dim_y (of size 1), then the mean over groups and padded target slots.
    return -masked.sum(-1).mean()


def official_segment_softmax(mean, tarqlen):
    """``segment_softmax`` computed the way the official ``GPO.forward`` is described: a
    zero tensor of the means' shape, written in place one question's slice at a time, the
    loop walking each group's row of the option-count tensor itself (its elements, 0-d
    tensors, are the slice bounds). Autograd then records one in-place copy per question
    and walks them back in the backward. Equal to ``segment_softmax`` (``cmd_export``
    asserts it); the benchmark times this form."""
    out = torch.zeros_like(mean)
    for b in range(mean.shape[0]):
        start = 0
        for n in tarqlen[b]:
            out[b, start:start + n] = torch.softmax(mean[b, start:start + n], dim=0)
            start += n
    return out


def official_style_loss(model, xc, yc, xt, yt, tarqlen):
    """The same loss computed step by step the way the official ``GPO.forward`` is
    described: the per-question softmax written in place (``official_segment_softmax``),
    per-group masking of the first ``real_len`` target slots (the loop walking the lengths'
    tensor), the std clamped at 1e-6, then ``masked.sum(-1).mean()``. ``cmd_export`` asserts
    it equals ``gpo_loss``."""
    out = model.predict(xc, yc, xt)
    mean, raw = torch.chunk(out, 2, dim=-1)
    mean = official_segment_softmax(mean, tarqlen)
    std = torch.clamp(torch.exp(raw), min=1e-6)
    log_probs = torch.distributions.Normal(mean, std).log_prob(yt)
    real_len = (xt.sum(-1) != 0).sum(1)
    assert int(real_len.max()) == yt.shape[1], "Nt must be the longest group's target count"
    masked = torch.zeros_like(log_probs)
    for i, n in enumerate(real_len):
        masked[i, :n] = log_probs[i, :n]
    return -(masked.sum(-1).mean())


def param_count(model):
    return sum(p.numel() for p in model.parameters())


def check_official_param_count():
    n = param_count(GPO(4096, **OFFICIAL))
    assert n == OFFICIAL_PARAMS_AT_4096, f"official model at D=4096 has {n} parameters"


def model_args(a):
    return dict(d_model=a.d_model, emb_depth=a.emb_depth, dim_feedforward=a.ffn, nhead=a.heads,
                num_layers=a.layers)


# ---------------------------------------------------------------------------- export


def random_questions(n_questions, dim_x):
    """x [P, D] (normal) and y [P, 1] (a random distribution per question) for
    questions of 2-5 options; returns (x, y, option counts)."""
    counts = torch.randint(2, 6, (n_questions,)).tolist()
    xs, ys = [], []
    for n in counts:
        xs.append(torch.randn(n, dim_x))
        ys.append(torch.distributions.Dirichlet(torch.ones(n)).sample().unsqueeze(-1))
    return torch.cat(xs), torch.cat(ys), counts


def pad_rows(t, n):
    return torch.cat([t, torch.zeros((n - t.shape[0],) + t.shape[1:], dtype=t.dtype)])


def random_batch(groups, dim_x):
    """A meta-batch whose groups have different numbers of real context and target
    points, padded with x = 0, y = 0 to the largest."""
    while True:
        ctx_q = torch.randint(1, 6, (groups,)).tolist()
        tgt_q = torch.randint(1, 6, (groups,)).tolist()
        ctx = [random_questions(q, dim_x) for q in ctx_q]
        tgt = [random_questions(q, dim_x) for q in tgt_q]
        nc_real = [c[0].shape[0] for c in ctx]
        nt_real = [t[0].shape[0] for t in tgt]
        if groups == 1 or (len(set(nc_real)) > 1 and len(set(nt_real)) > 1):
            break
    nc, nt, q = max(nc_real), max(nt_real), max(tgt_q)
    xc = torch.stack([pad_rows(c[0], nc) for c in ctx])
    yc = torch.stack([pad_rows(c[1], nc) for c in ctx])
    xt = torch.stack([pad_rows(t[0], nt) for t in tgt])
    yt = torch.stack([pad_rows(t[1], nt) for t in tgt])
    tarqlen = torch.zeros(groups, q, dtype=torch.int64)
    for b, t in enumerate(tgt):
        tarqlen[b, :len(t[2])] = torch.tensor(t[2])
    return dict(xc=xc.contiguous(), yc=yc.contiguous(), xt=xt.contiguous(), yt=yt.contiguous(),
                tarqlen=tarqlen), nc_real, nt_real


def cmd_export(a):
    from safetensors.torch import save_file

    check_official_param_count()
    torch.manual_seed(a.seed)
    model = GPO(a.dim_x, **model_args(a))
    if a.perturb > 0:
        # Optional: break the symmetries of the default init (identical encoder layers,
        # zero attention biases, unit LayerNorms) so a fixture also catches mix-ups there.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * a.perturb)
    model.train()  # dropout is 0; train mode keeps PyTorch off its inference fast path
    batch, nc_real, nt_real = random_batch(a.groups, a.dim_x)
    names = ["xc", "yc", "xt", "yt", "tarqlen"]

    with torch.no_grad():
        loss32 = gpo_loss(model, *(batch[n] for n in names)).item()
        model64 = GPO(a.dim_x, **model_args(a)).double()
        model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
        model64.train()
        b64 = [batch[n].double() if batch[n].is_floating_point() else batch[n] for n in names]
        loss64 = gpo_loss(model64, *b64).item()
        check = official_style_loss(model64, *b64).item()
        assert abs(check - loss64) <= 1e-12 * abs(loss64), (check, loss64)

    os.makedirs(a.out, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(a.out, "weights.safetensors"))
    save_file(batch, os.path.join(a.out, "batch.safetensors"))
    config = dict(dim_x=a.dim_x, dim_y=1, layer_norm_eps=1e-5, groups=a.groups, seed=a.seed,
                  perturb=a.perturb, params=param_count(model), nc=batch["xc"].shape[1],
                  nt=batch["xt"].shape[1], real_context=nc_real, real_targets=nt_real,
                  tarqlen=batch["tarqlen"].tolist(), torch=torch.__version__, **model_args(a))
    with open(os.path.join(a.out, "expected.json"), "w") as f:
        json.dump(dict(loss=loss64, loss_f32=loss32, config=config), f, indent=2)
        f.write("\n")
    print(f"wrote {a.out}: loss={loss64!r} loss_f32={loss32!r} params={config['params']}")


# ----------------------------------------------------------------------------- bench

OPTION_COUNTS = {2: 0.2, 3: 0.25, 4: 0.3, 5: 0.25}


def load_shapes(path, dim_x, groups):
    """The batch shapes `gpo bench step --shapes-out` wrote, checked against the run's."""
    with open(path) as fh:
        replay = json.load(fh)
    if replay["groups"] != groups or replay["dim_x"] != dim_x:
        sys.exit(f"{path}: recorded for dim_x {replay['dim_x']} and {replay['groups']} "
                 f"groups, not --dim-x {dim_x} --groups {groups}")
    return replay


def replayed_questions(step, dim_x, g):
    """gpo's own batch shape (`gpo bench step --shapes-out`) as the official dataset holds
    it: per group, the step's questions in order (context, then target), each with its
    options' x (``q_emb``, ``[n, D]``, the same for every group) and the group's
    distribution over them (``prob_ys``, ``[n, 1]``); new random values (the step's cost
    depends on the shapes only). Returns (questions per group, context indices, target
    indices) for ``official_collate``."""
    cc, tc = step["context"], step["target"]
    counts = cc + tc
    xs = [torch.randn(n, dim_x) for n in counts]
    per_group = [[dict(q_emb=x, prob_ys=torch.distributions.Dirichlet(torch.ones(n)).sample()
                       .unsqueeze(-1)) for x, n in zip(xs, counts)] for _ in range(g)]
    return per_group, list(range(len(cc))), list(range(len(cc), len(counts)))


def official_collate(per_group, ctx_idx, tar_idx):
    """The official OpinionQA collate as described: for each group, its context and target
    questions' option rows concatenated (x, then y), the target questions' option counts as
    a tensor, the whole sequence (context then target) as well, then every field stacked
    over the groups. Part of the timed step, as gpo's own batch assembly is part of its."""
    fields = {k: [] for k in ("x", "xc", "xt", "y", "yc", "yt", "tarqlen")}
    for qs in per_group:
        cq = [qs[i] for i in ctx_idx]
        tq = [qs[i] for i in tar_idx]
        xc = torch.cat([q["q_emb"] for q in cq], dim=0)
        yc = torch.cat([q["prob_ys"] for q in cq], dim=0)
        xt = torch.cat([q["q_emb"] for q in tq], dim=0)
        yt = torch.cat([q["prob_ys"] for q in tq], dim=0)
        fields["x"].append(torch.cat([xc, xt], dim=0))
        fields["xc"].append(xc)
        fields["xt"].append(xt)
        fields["y"].append(torch.cat([yc, yt], dim=0))
        fields["yc"].append(yc)
        fields["yt"].append(yt)
        fields["tarqlen"].append(torch.tensor([len(q["prob_ys"]) for q in tq]))
    b = {k: torch.stack(v) for k, v in fields.items()}
    return b["xc"], b["yc"], b["xt"], b["yt"], b["tarqlen"]


def replayed_batch(step, dim_x, g):
    """``replayed_questions`` collated: the batch tensors (xc, yc, xt, yt, tarqlen)."""
    return official_collate(*replayed_questions(step, dim_x, g))


def cmd_flops(a):
    """PyTorch's own count (FlopCounterMode) of the matrix-product operations of the
    official step's forward and backward on gpo's batch shapes: the cross-check of
    `gpo bench step`'s official_flops_per_step."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(a.seed)
    model = GPO(a.dim_x, **model_args(a))
    model.train()
    replay = load_shapes(a.shapes, a.dim_x, a.groups)
    counts = []
    for it, step in enumerate(replay["steps"]):
        batch = replayed_batch(step, a.dim_x, a.groups)
        counter = FlopCounterMode(display=False)
        with counter:
            official_style_loss(model, *batch).backward()
        model.zero_grad()
        if it >= replay["warmup"]:
            counts.append(counter.get_total_flops())
    print(f"official_flops_per_step={sum(counts) / len(counts):.4e} (FlopCounterMode, mean of "
          f"{len(counts)} timed steps, torch={torch.__version__})")


def cmd_bench(a):
    check_official_param_count()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model = GPO(a.dim_x, **model_args(a))
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)

    # Pool of questions: option counts, x per option point, per-group distributions.
    ks = torch.tensor(list(OPTION_COUNTS))
    counts = ks[torch.multinomial(torch.tensor(list(OPTION_COUNTS.values())), a.questions,
                                  replacement=True)].tolist()
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    x_pool = torch.randn(starts[-1], a.dim_x)
    y_pool = torch.cat([torch.distributions.Dirichlet(torch.ones(n)).sample((a.groups,))
                        for n in counts], dim=1)  # [G, P]
    g = a.groups
    # The dataset as the official one holds it: per group, every question's option rows.
    pool = [[dict(q_emb=x_pool[starts[q]:starts[q + 1]],
                  prob_ys=y_pool[b, starts[q]:starts[q + 1]].unsqueeze(-1))
             for q in range(a.questions)] for b in range(g)]

    def draw_official():
        # The official OpinionQA collate's draw: one permutation shared by the groups,
        # n_ctx and n_tgt drawn as collate_fn_gpo draws them.
        perm = torch.randperm(a.questions).tolist()
        n_ctx = int(torch.randint(10, min(100, a.questions - 10) + 1, ()).item())
        n_tgt = int(torch.randint(10, min(100, a.questions - n_ctx) + 1, ()).item())
        return pool, perm[:n_ctx], perm[n_ctx:n_ctx + n_tgt]

    replay = None
    if a.shapes:
        replay = load_shapes(a.shapes, a.dim_x, g)
        a.warmup = replay["warmup"]
        a.iters = len(replay["steps"]) - a.warmup

    def draw(it):
        if replay:
            return replayed_questions(replay["steps"][it], a.dim_x, g)
        return draw_official()

    print(f"bench: dim_x={a.dim_x} groups={g} threads={torch.get_num_threads()} "
          f"params={param_count(model)} questions={a.questions} "
          f"mean_options={sum(counts) / len(counts):.3f} torch={torch.__version__}")
    times, pts = [], []
    for it in range(a.warmup + a.iters):
        questions = draw(it)  # the draw is not timed; the collate is, as gpo's assembly is
        t0 = time.perf_counter()
        batch = official_collate(*questions)
        loss = official_style_loss(model, *batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        dt = time.perf_counter() - t0
        tag = "warmup" if it < a.warmup else "step"
        print(f"{tag} {it}: nc={batch[0].shape[1]} nt={batch[2].shape[1]} "
              f"loss={loss.item():.4f} step_s={dt:.4f}", flush=True)
        if it >= a.warmup:
            times.append(dt)
            pts.append(batch[0].shape[1] + batch[2].shape[1])
    print(f"mean points/group {sum(pts) / len(pts):.0f} over {len(times)} timed steps")
    print(f"median_step_s={statistics.median(times):.6f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def sizes(sp):
        sp.add_argument("--dim-x", type=int, required=True, help="width of x (LLM embedding)")
        sp.add_argument("--d-model", type=int, default=OFFICIAL["d_model"])
        sp.add_argument("--layers", type=int, default=OFFICIAL["num_layers"])
        sp.add_argument("--heads", type=int, default=OFFICIAL["nhead"])
        sp.add_argument("--ffn", type=int, default=OFFICIAL["dim_feedforward"])
        sp.add_argument("--emb-depth", type=int, default=OFFICIAL["emb_depth"])

    e = sub.add_parser("export", help="write a fixture: weights, batch and expected loss")
    e.add_argument("--out", required=True, help="output folder")
    sizes(e)
    e.add_argument("--groups", type=int, required=True)
    e.add_argument("--seed", type=int, required=True)
    e.add_argument("--perturb", type=float, default=0.0,
                   help="add N(0, s^2) noise to every parameter after the default init")

    b = sub.add_parser("bench", help="time the official-style training step")
    sizes(b)
    b.add_argument("--groups", type=int, default=8)
    b.add_argument("--iters", type=int, default=20)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--questions", type=int, default=684, help="questions in the pool")
    b.add_argument("--lr", type=float, default=3e-4)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--shapes", help="replay the batch shapes `gpo bench step --shapes-out` "
                   "wrote (the same questions' option counts, step by step)")

    fl = sub.add_parser("flops", help="count the official step's matrix-product operations "
                        "on gpo's batch shapes with PyTorch's FlopCounterMode")
    sizes(fl)
    fl.add_argument("--groups", type=int, default=8)
    fl.add_argument("--seed", type=int, default=0)
    fl.add_argument("--shapes", required=True, help="`gpo bench step --shapes-out` file")

    a = p.parse_args(argv)
    {"export": cmd_export, "bench": cmd_bench, "flops": cmd_flops}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
