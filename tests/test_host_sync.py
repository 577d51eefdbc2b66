"""A training step reads nothing back from the device between the forward pass and the
optimizer step, but the one read it keeps on purpose (issue 21; docs/gpu.md).

On CPU nothing waits, so the test watches the operations themselves: one real step
(fairseq's ``task.train_step``: the criterion's forward and loss, then the backward) of
MDLM, MDLM with padding and time conditioning, BD3 (with its training mask-rate range),
SEDD and the AR twin, built from fairseq flags on a batch of fairseq's own pipeline,
runs under :class:`HostReads`, which raises at any operation that on a GPU makes the
host wait for the device:

- a tensor's value read on the host: ``_local_scalar_dense`` (what ``.item()``,
  ``bool()``, ``int()``, ``float()`` and formatting of a tensor call), ``equal``,
  ``is_nonzero``;
- an output shape that depends on the data (the host must learn it): ``nonzero``,
  ``masked_select``, ``unique``, boolean indexing, ``repeat_interleave`` by a tensor
  without ``output_size``;
- a tensor built from host data (``torch.tensor([...], device=...)``): a blocking
  host-to-device copy on a GPU.

``.tolist()``, ``.numpy()`` and ``.cpu()`` never reach the dispatcher on CPU: they are
made to raise during the step instead. The kept read, the ``nonzero`` of the masked
positions in ``DiT.output_rows``, is allowed there only, and counted. The detector is shown
to catch each kind of read planted in the same step, in the forward and the backward.
"""
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import USER_DIR

aten = torch.ops.aten
VALUE_READS = {"_local_scalar_dense", "item", "is_nonzero", "equal"}
DATA_SHAPED = {"nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
               "unique_consecutive", "unique_dim_consecutive"}
INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}
# the one read a step keeps (docs/gpu.md): (file, function, operation)
KEPT = {(os.path.join("models", "backbone.py"), "output_rows", "nonzero")}


class HostRead(AssertionError):
    """An operation that would make the host wait for a GPU."""


def host_read(func, args, kwargs):
    """Why ``func`` on these arguments reads from the device on a GPU, or None."""
    name = func.overloadpacket.__name__
    if name in VALUE_READS:
        return "a tensor's value read on the host"
    if name in DATA_SHAPED:
        return "an output shape that depends on the data"
    if name in INDEXING and any(i is not None and i.dtype in (torch.bool, torch.uint8)
                                for i in args[1]):
        return "boolean indexing (its shape depends on the data)"
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave by a tensor (its shape depends on the data)"
    if name == "lift_fresh":
        return "a tensor built from host data (a blocking host-to-device copy)"
    return None


class HostReads(TorchDispatchMode):
    """Raises :class:`HostRead` at the first host read (``host_read``) outside ``KEPT``;
    ``kept`` counts the reads ``KEPT`` allows."""

    PATCHED = ("tolist", "numpy", "cpu")

    def __init__(self):
        super().__init__()
        self.kept = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = host_read(func, args, kwargs)
        if why is not None:
            stack = traceback.extract_stack()[:-1]
            name = func.overloadpacket.__name__
            if any(f.filename.endswith(path) and f.name == fn and name == op
                   for f in stack for path, fn, op in KEPT):
                self.kept += 1
            else:
                raise HostRead(f"{func}: {why}, at\n" + "".join(traceback.format_list(stack[-6:])))
        return func(*args, **kwargs)

    def __enter__(self):
        def refuse(name):
            def method(*args, **kwargs):
                raise HostRead(f"Tensor.{name}() reads the tensor on the host")
            return method
        self.saved = {name: torch.Tensor.__dict__.get(name) for name in self.PATCHED}
        for name in self.PATCHED:
            setattr(torch.Tensor, name, refuse(name))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self.saved.items():     # back to torch's own methods
            if method is None:
                delattr(torch.Tensor, name)          # inherited from TensorBase
            else:
                setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)


# --------------------------------------------------------------------------- a real step

WORDS = 30
LENGTHS = [5, 9, 3, 12, 7, 6, 14, 4, 8, 10, 2, 11]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A dictionary and a binarized train split, written as fairseq-preprocess writes
    them: sentences of different lengths (so --sample-break-mode eos pads)."""
    from fairseq.data import Dictionary, indexed_dataset
    root = tmp_path_factory.mktemp("host_sync")
    d = Dictionary()
    for i in range(WORDS):
        d.add_symbol(f"w{i}", n=WORDS - i)
    d.save(str(root / "dict.txt"))
    g = torch.Generator().manual_seed(0)
    builder = indexed_dataset.make_builder(str(root / "train.bin"), impl="mmap",
                                           vocab_size=len(d))
    for n in LENGTHS * 3:
        words = torch.randint(d.nspecial, len(d), (n,), generator=g)
        builder.add_item(torch.cat([words, torch.tensor([d.eos()])]).int())
    builder.finalize(str(root / "train.idx"))
    return root


SIZE = ["--layers", "2", "--embed-dim", "32", "--attention-heads", "2", "--cond-dim", "16",
        "--tokens-per-sample", "16"]
MDLM = ["--task", "masked_diffusion", "--arch", "mdlm_tiny", *SIZE]
STEPS = {
    "mdlm": MDLM + ["--criterion", "mdlm"],
    "mdlm_padded_time_conditioned": MDLM + ["--criterion", "mdlm", "--time-conditioning",
                                            "--sample-break-mode", "eos"],
    "bd3_padded_mask_rate": MDLM + ["--criterion", "mdlm", "--block-size", "4",
                                    "--train-mask-rate", "0.3", "0.8",
                                    "--sample-break-mode", "eos"],
    "sedd": MDLM + ["--criterion", "sedd", "--time-conditioning", "--time-sampling", "iid"],
    "ar_twin": ["--task", "language_modeling", "--arch", "mdlm_ar_tiny", *SIZE,
                "--criterion", "cross_entropy"],
}


def build(data, flags, padded=False):
    """Task, model, criterion, fairseq optimizer and the first training batch with
    (``padded``) or without padding, as fairseq-train builds them from ``flags``."""
    from fairseq import optim, options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    args = options.parse_args_and_arch(options.get_training_parser(), [
        str(data), "--user-dir", USER_DIR, "--cpu", "--optimizer", "adam", "--lr", "1e-3",
        "--batch-size", "4", *flags])
    cfg = convert_namespace_to_omegaconf(args)
    torch.manual_seed(0)
    task = tasks.setup_task(cfg.task)
    model, criterion = task.build_model(cfg.model), task.build_criterion(cfg.criterion)
    optimizer = optim.build_optimizer(cfg.optimizer, list(model.parameters()))
    task.load_dataset("train")
    batches = task.get_batch_iterator(task.dataset("train"), max_sentences=4)
    sample = next(s for s in batches.next_epoch_itr(shuffle=False)
                  if (s["ntokens"] < s["target"].numel()) == padded)
    return task, model, criterion, optimizer, sample


def train_step(task, model, criterion, optimizer, sample, detector):
    """fairseq's forward, loss and backward of one update under ``detector``."""
    with detector:
        loss, sample_size, log = task.train_step(sample, model, criterion, optimizer,
                                                 update_num=0)
    return loss, sample_size, log


@pytest.mark.parametrize("name", list(STEPS))
def test_a_training_step_reads_nothing_from_the_device(data, name):
    task, model, criterion, optimizer, sample = build(data, STEPS[name], "padded" in name)
    before = [p.detach().clone() for p in model.parameters()]
    detector = HostReads()
    loss, sample_size, log = train_step(task, model, criterion, optimizer, sample, detector)
    # MDLM, BD3 and SEDD: the kept count of the masked positions, once; the AR twin: none
    assert detector.kept == (0 if name == "ar_twin" else 1)
    # a real step: a finite loss, the host's token count, a gradient everywhere, and
    # the optimizer (outside the watched part) moves the weights
    assert torch.isfinite(loss) and sample_size == sample["ntokens"]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # the training log is summed by fairseq and read after the optimizer step
    assert float(log["loss"]) == pytest.approx(float(loss))


def test_the_host_knows_the_padding_token_count_and_first_id(data):
    """What replaces the reads: the collater's counts agree with the device's."""
    task, model, _, _, sample = build(data, STEPS["mdlm_padded_time_conditioned"], True)
    x = sample["target"]
    inp = task.bound_input(sample, model)
    pad = x.eq(task.source_dictionary.pad())
    assert inp.padded is True and torch.equal(inp.not_scored, pad)
    assert inp.n_scored == int((~pad).sum())
    assert sample["first_id"] == int(sample["id"].min())
    task, model, _, _, sample = build(data, STEPS["mdlm"])
    inp = task.bound_input(sample, model)
    assert inp.padded is False and inp.not_scored is None
    assert inp.n_scored == sample["target"].numel()


def _item_in_forward(model):
    return model.backbone.blocks[0].register_forward_hook(lambda m, i, out: out.sum().item())


def _bool_in_forward(model):
    return model.backbone.blocks[0].register_forward_hook(lambda m, i, out: bool(out.any()))


def _mask_index_in_forward(model):
    return model.backbone.blocks[0].register_forward_hook(lambda m, i, out: out[out > 0])


def _host_tensor_in_forward(model):
    return model.backbone.blocks[0].register_forward_hook(
        lambda m, i, out: out.index_fill(-1, torch.tensor([0], device=out.device), 0.0))


def _tolist_in_forward(model):
    return model.backbone.blocks[0].register_forward_hook(lambda m, i, out: out[0, 0].tolist())


def _item_in_backward(model):
    return model.backbone.embed.weight.register_hook(lambda grad: grad.sum().item())


@pytest.mark.parametrize("plant", [_item_in_forward, _bool_in_forward, _mask_index_in_forward,
                                   _host_tensor_in_forward, _tolist_in_forward,
                                   _item_in_backward])
def test_the_detector_catches_a_planted_read(data, plant):
    task, model, criterion, optimizer, sample = build(data, STEPS["mdlm"])
    methods = [getattr(torch.Tensor, name) for name in HostReads.PATCHED]
    handle = plant(model)
    with pytest.raises(HostRead):
        train_step(task, model, criterion, optimizer, sample, HostReads())
    handle.remove()
    # the patched methods are torch's again
    assert [getattr(torch.Tensor, name) for name in HostReads.PATCHED] == methods
    train_step(task, model, criterion, optimizer, sample, HostReads())   # and it was the plant
