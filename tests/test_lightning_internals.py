"""The private Lightning internals of dgm_scale/core/lightning_internals.py, on the installed Lightning."""
import lightning as L
import torch
from lightning.pytorch.loggers import Logger

from dgm_scale.core.lightning_internals import count_skipped_optimizer_step, logger_step


class StepRecorder(Logger):
    name, version = "recorder", "0"

    def __init__(self):
        super().__init__()
        self.steps: list[tuple[str, int]] = []

    def log_metrics(self, metrics, step=None):
        self.steps += [(key, step) for key in metrics if key != "epoch"]

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class TwoOptimizers(L.LightningModule):
    """Manual optimisation like our GANs: two optimizers; in odd batches the second one's step
    is skipped through count_skipped_optimizer_step."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        self.seen_logger_steps: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen_logger_steps.append(logger_step(self.trainer))
        self.log("value", float(batch_idx))
        for index, (opt, net) in enumerate(zip(self.optimizers(), (self.a, self.b))):
            self.manual_backward(net(batch).square().mean())
            if index == 1 and batch_idx % 2 == 1:
                opt.zero_grad()
                count_skipped_optimizer_step(opt)
            else:
                opt.step()
                opt.zero_grad()

    def configure_optimizers(self):
        return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(4, 2), batch_size=1)


def test_skipped_steps_count_and_logger_step_is_the_batch_step(tmp_path):
    module, recorder = TwoOptimizers(), StepRecorder()
    b_before = module.b.weight.detach().clone()
    trainer = L.Trainer(max_epochs=1, logger=recorder, log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module)
    # Every optimizer "step" counted, real or skipped: 4 batches x 2 optimizers.
    assert trainer.global_step == 8
    assert not torch.equal(module.b.weight, b_before)  # (the even batches stepped b for real)
    # logger_step in a batch is the step Lightning gives that batch's self.log values.
    assert module.seen_logger_steps == [0, 1, 2, 3]
    assert [step for key, step in recorder.steps if key == "value"] == module.seen_logger_steps
