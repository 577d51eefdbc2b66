"""Self-distillation through time (SDTT): the two-step teacher target, the divergence,
a round through fairseq-train, and the bad-input errors."""
import itertools
import json
import re

import pytest
import torch

from conftest import TINY_MODEL, USER_DIR, fairseq_cli, train_tiny
from mdlm_plugin.diffusion import sdtt
from mdlm_plugin.diffusion.schedules import LogLinearSchedule

V, MASK = 5, 4                      # 4 tokens and <mask>
SCHEDULE = LogLinearSchedule()


class Oracle:
    """A denoiser over V tokens. ``independent``: position i's logits are
    a[i] + sigma * b[i], whatever the other positions hold (time-conditioned when
    b != 0); else they also move with the tokens revealed elsewhere in the row, so
    the teacher's second call depends on its first step's draws."""

    def __init__(self, length, time_scale=1.0, independent=True, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.a = 0.5 * torch.randn(length, V, generator=g, dtype=torch.float64)
        self.b = time_scale * torch.randn(length, V, generator=g, dtype=torch.float64)
        self.c = torch.zeros(V, V, dtype=torch.float64) if independent else \
            0.7 * torch.randn(V, V, generator=g, dtype=torch.float64)

    def full(self, z, sigma):
        logits = self.a + sigma.double().view(-1, 1, 1) * self.b
        revealed = torch.nn.functional.one_hot(z, V).double()
        revealed[..., MASK] = 0
        context = revealed.sum(1, keepdim=True) - revealed          # the other positions
        logits = logits + context @ self.c
        logits[..., MASK] = -30.0                                   # ignored (SUBS)
        return logits

    def __call__(self, z, sigma, positions):
        return self.full(z, sigma)[positions].float()


def clean_probs(oracle, z, sigma):
    p = torch.softmax(oracle.full(z, sigma)[..., :MASK], -1)
    return torch.cat([p, torch.zeros(*p.shape[:-1], 1, dtype=p.dtype)], -1)


def expected_target(oracle, z_t, t, m):
    """E[exp(target)] at the masked positions of z_t, by enumerating every z_m the
    teacher's first ddpm step t -> m can reach, with its exact probability."""
    masked = (z_t == MASK).nonzero().tolist()
    stay = float(SCHEDULE.mask_prob(m) / SCHEDULE.mask_prob(t))
    sigma_t = SCHEDULE.sigma(torch.full((1,), t)).float()
    sigma_m = SCHEDULE.sigma(torch.full((1,), m)).float()
    x1 = clean_probs(oracle, z_t, sigma_t)
    first = oracle(z_t, sigma_t, z_t == MASK)
    total, mass = 0.0, 0.0
    for outcome in itertools.product(range(V), repeat=len(masked)):   # MASK: stays masked
        z_m, p = z_t.clone(), 1.0
        for (row, pos), v in zip(masked, outcome):
            z_m[row, pos] = v
            p *= stay if v == MASK else (1 - stay) * float(x1[row, pos, v])
        target = sdtt.two_step_target(oracle, z_t, z_m, first, torch.full((1,), m),
                                      SCHEDULE, MASK)
        # the target at each position, written out: x1 where z_m unmasked it, else x2
        x2 = clean_probs(oracle, z_m, sigma_m)
        by_hand = torch.stack([x1[r, i] if z_m[r, i] != MASK else x2[r, i]
                               for r, i in masked])
        assert torch.allclose(target.exp().double(), by_hand, atol=1e-6)
        total, mass = total + p * by_hand, mass + p
    assert abs(mass - 1) < 1e-9
    return total


def test_target_is_x1_or_x2_and_its_mean_is_exact_against_enumeration():
    t, m = 0.75, 0.5                  # a wide step, so both branches carry weight
    z_t = torch.tensor([[MASK, 2, MASK, MASK]])
    # independent positions: the mean is P1 x1 + (1 - P1) x2 in closed form
    oracle = Oracle(4, time_scale=2.0)
    exact = expected_target(oracle, z_t, t, m)
    p1 = 1 - float(SCHEDULE.mask_prob(torch.tensor(m)) / SCHEDULE.mask_prob(torch.tensor(t)))
    sig = lambda u: SCHEDULE.sigma(torch.full((1,), u)).float()
    closed = p1 * clean_probs(oracle, z_t, sig(t))[z_t == MASK] + \
        (1 - p1) * clean_probs(oracle, z_t, sig(m))[z_t == MASK]
    assert torch.allclose(exact, closed, atol=1e-6)
    assert (exact - clean_probs(oracle, z_t, sig(t))[z_t == MASK]).abs().max() > 0.05

    # positions that interact: the teacher's sampled first step against enumeration
    oracle = Oracle(4, time_scale=1.0, independent=False, seed=1)
    exact = expected_target(oracle, z_t, t, m)
    n = 20000
    rows = z_t.expand(n, -1)
    first, z_m = sdtt.teacher_first_step(oracle, rows, torch.full((n,), t, dtype=torch.float64),
                                         torch.full((n,), m, dtype=torch.float64), SCHEDULE,
                                         MASK, generator=torch.Generator().manual_seed(0))
    target = sdtt.two_step_target(oracle, rows, z_m, first, torch.full((n,), m), SCHEDULE, MASK)
    mean = target.exp().double().view(n, 3, V).mean(0)
    se = target.exp().double().view(n, 3, V).std(0) / n ** 0.5
    assert ((mean - exact).abs() <= 5 * se + 1e-9).all(), (mean, exact)
    # and not what the first call alone says: the second call matters
    x1 = clean_probs(oracle, z_t, SCHEDULE.sigma(torch.full((1,), t)).float())[z_t == MASK]
    assert (exact - x1).abs().max() > 20 * se.max()


def test_analytic_step_takes_per_row_times():
    """The ancestral rule with one time per masked position: ddpm and analytic agree
    (they are the same kernel for the absorbing process) row by row."""
    oracle = Oracle(6, time_scale=1.0)
    n = 4000
    z_t = torch.full((n, 6), MASK)
    t = torch.linspace(0.3, 1.0, n, dtype=torch.float64)
    m = t - 0.2
    outs = [sdtt.teacher_first_step(oracle, z_t, t, m, SCHEDULE, MASK, sampler=s,
                                    time_conditioned=True,
                                    generator=torch.Generator().manual_seed(5))[1]
            for s in ("ddpm", "analytic")]
    unmasked = [(o != MASK).double().mean(1) for o in outs]
    expected = 1 - SCHEDULE.mask_prob(m) / SCHEDULE.mask_prob(t)
    for u in unmasked:       # each row leaves the mask at its own rate
        lo, hi = u[: n // 2].mean(), u[n // 2:].mean()
        assert abs(lo - expected[: n // 2].mean()) < 0.02
        assert abs(hi - expected[n // 2:].mean()) < 0.02


@pytest.mark.parametrize("kind", sdtt.DIVERGENCES)
def test_student_equal_to_two_step_teacher_has_zero_loss(kind):
    """A teacher without time conditioning and with independent positions says the
    same in both of its steps, so the two-step target is the teacher itself."""
    teacher = Oracle(8, time_scale=0.0)
    x = torch.randint(0, MASK, (64, 8), generator=torch.Generator().manual_seed(1))
    terms = sdtt.sdtt_loss(teacher, teacher, x, SCHEDULE, MASK, steps=4, divergence_kind=kind,
                           generator=torch.Generator().manual_seed(2))
    assert terms.n_masked > 100
    assert terms.per_position.abs().max() < 1e-6
    other = Oracle(8, time_scale=0.0, seed=7)
    worse = sdtt.sdtt_loss(other, teacher, x, SCHEDULE, MASK, steps=4, divergence_kind=kind,
                           generator=torch.Generator().manual_seed(2))
    assert worse.per_position.mean() > 0.05


class TableStudent(torch.nn.Module):
    """Independent positions, no time conditioning: one logit row per position."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone().float())

    def forward(self, z, sigma, positions):
        return self.logits.unsqueeze(0).expand(z.size(0), -1, -1)[positions]


@pytest.mark.parametrize("kind", sdtt.DIVERGENCES)
def test_gradient_moves_a_perturbed_student_towards_the_teacher(kind):
    teacher = Oracle(8, time_scale=0.0)
    target = torch.softmax(teacher.a[:, :MASK], -1).float()
    start = teacher.a.clone()
    start[:, :MASK] += torch.randn(8, MASK, generator=torch.Generator().manual_seed(3))
    student = TableStudent(start)
    opt = torch.optim.SGD(student.parameters(), lr=3.0)

    def distance():
        return (torch.softmax(student.logits[:, :MASK], -1) - target).abs().sum().item()

    before = distance()
    x = torch.randint(0, MASK, (32, 8), generator=torch.Generator().manual_seed(4))
    for step in range(30):
        loss = sdtt.sdtt_loss(student, teacher, x, SCHEDULE, MASK, steps=8, divergence_kind=kind,
                              generator=torch.Generator().manual_seed(100 + step))
        opt.zero_grad()
        loss.per_position.mean().backward()
        opt.step()
    assert distance() < 0.5 * before, (before, distance())


def test_halving_rounds_and_unreachable_step_counts():
    assert sdtt.halving_rounds(128, 8) == [64, 32, 16, 8]
    for start, stop in ((128, 48), (128, 128), (100, 8)):
        with pytest.raises(ValueError, match="not reachable by halving"):
            sdtt.halving_rounds(start, stop)
    sdtt.check_steps_reachable(16, 32)
    sdtt.check_steps_reachable(13, None)            # a data-trained teacher: any T
    with pytest.raises(ValueError, match="takes 16"):
        sdtt.check_steps_reachable(12, 32)


# ---------------------------------------------------------------------- fairseq

@pytest.fixture(scope="module")
def teacher_ckpt(ptb_tiny, tmp_path_factory):
    """A tiny MDLM trained by fairseq-train for 20 updates: the teacher."""
    save = tmp_path_factory.mktemp("teacher")
    train_tiny(ptb_tiny, save, updates=20)
    return save / "checkpoint_best.pt"


def sdtt_flags(teacher, *extra):
    return ["--criterion", "sdtt", "--teacher-path", teacher, *extra]


def build(data, *flags):
    """The task, model and criterion fairseq-train would build from ``flags``."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    args = options.parse_args_and_arch(options.get_training_parser(), [
        str(data), "--user-dir", USER_DIR, "--task", "masked_diffusion", "--cpu",
        *TINY_MODEL, *map(str, flags)])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    return task, task.build_model(cfg.model), task.build_criterion(cfg.criterion)


def edited_checkpoint(src, dst, edit):
    state = torch.load(src, map_location="cpu", weights_only=False)   # cfg: a plain dict
    edit(state)
    torch.save(state, dst)
    return dst


def test_a_round_through_fairseq_train_resumes_validates_and_samples(ptb_tiny, teacher_ckpt,
                                                                      tmp_path):
    """A round resumes like any fairseq run and its student is a plain mdlm checkpoint.
    (That a round lowers the divergence is not asserted: with a teacher this weak the
    student equal to it is already at ~1e-6, below what dropout noise moves.)"""
    teacher_path = tmp_path / "teacher.pt"
    teacher_path.write_bytes(teacher_ckpt.read_bytes())
    train = ["train", ptb_tiny, "--user-dir", USER_DIR, "--task", "masked_diffusion",
             *TINY_MODEL, *sdtt_flags(teacher_path, "--sdtt-steps", "4"),
             "--finetune-from-model", teacher_path, "--dropout", "0",   # as the eval teacher
             "--batch-size", "16", "--optimizer", "adam",
             "--lr", "2e-3", "--cpu", "--save-dir", tmp_path / "student", "--seed", "1",
             "--log-format", "json", "--log-interval", "5", "--no-epoch-checkpoints",
             "--num-workers", "0"]
    fairseq_cli(*train, "--max-update", "10")
    resumed = fairseq_cli(*train, "--max-update", "20")          # the same run, resumed
    log = resumed.stdout + resumed.stderr
    assert re.search(r"loaded checkpoint .*checkpoint_last\.pt .*10 updates", log, re.I), \
        log[-2000:]
    valid = [json.loads(line.split("|")[-1]) for line in log.splitlines()
             if '"valid_sdtt_div"' in line]
    assert valid and float(valid[-1]["valid_sdtt_div"]) > 0

    # the student is a plain mdlm checkpoint: fairseq-validate gives the bound without
    # the teacher, fairseq-generate samples it at half the teacher's steps
    teacher_path.unlink()
    ckpt = tmp_path / "student" / "checkpoint_last.pt"
    out = fairseq_cli("validate", ptb_tiny, "--user-dir", USER_DIR, "--task", "masked_diffusion",
                      "--path", ckpt, "--batch-size", "16", "--cpu")
    assert re.search(r"valid on 'valid' subset \| loss [\d.]+ \| mask_frac .* ppl [\d.]+",
                     out.stdout + out.stderr)
    gen = fairseq_cli("generate", ptb_tiny, "--user-dir", USER_DIR, "--task", "masked_diffusion",
                      "--path", ckpt, "--gen-subset", "test", "--batch-size", "8",
                      "--prefix-size", "0", "--steps", "4",
                      "--sampler", "ddpm", "--seed", "1", "--cpu")
    text = gen.stdout + gen.stderr
    calls = re.search(r"mdlm sampling: (\d+) samples, \d+ tokens filled, (\d+) network calls", text)
    assert calls and int(calls.group(1)) > 0, text[-2000:]
    assert len(re.findall(r"^H-\d+\t", gen.stdout, re.M)) == int(calls.group(1))


def test_bad_teachers_get_one_clear_error(ptb_tiny, teacher_ckpt, tmp_path):
    from mdlm_plugin.errors import MDLMUserError
    good = teacher_ckpt

    def flip_dictionary(state):
        state["model"]["dictionary_version"] = 255 - state["model"]["dictionary_version"]

    def time_conditioned(state):
        state["cfg"]["model"]["time_conditioning"] = True

    def distilled_for_8(state):
        state["cfg"]["criterion"] = {"_name": "sdtt", "sdtt_steps": 8}

    cases = [
        (flip_dictionary, [], "different dictionary"),
        (None, ["--embed-dim", "32"], r"another architecture than the student: embed_dim 64"),
        (time_conditioned, ["--time-conditioning", "--sdtt-sampler", "ddpm_cache"],
         "needs a model without time conditioning"),
        (distilled_for_8, [], r"distilled for 8 steps, so this round's student takes 4 .*, not 3"),
    ]
    for k, (edit, flags, message) in enumerate(cases):
        path = edited_checkpoint(good, tmp_path / f"t{k}.pt", edit) if edit else good
        _, model, criterion = build(ptb_tiny, *sdtt_flags(path, "--sdtt-steps", "3"), *flags)
        with pytest.raises(MDLMUserError, match=message):
            criterion.load_teacher(model)
