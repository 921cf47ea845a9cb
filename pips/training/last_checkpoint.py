"""``checkpoints/last.ckpt`` at every validation, whether or not the best metric improved.

Lightning's ``ModelCheckpoint(save_last=True)`` writes ``last`` only when it also wrote a top-k
checkpoint at that step, so a run killed after several validations that did not improve lost
everything since the last improvement. :class:`EveryValidationCheckpoint` keeps the best-k logic
as it is and then writes ``last.ckpt`` (atomically, through the run's checkpoint plugin) at every
validation it has not yet written it at. Its state key is ModelCheckpoint's, so checkpoints of
either class resume with the other.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class EveryValidationCheckpoint(ModelCheckpoint):
    @property
    def state_key(self) -> str:
        own = super().state_key
        return ModelCheckpoint.__qualname__ + own.removeprefix(type(self).__qualname__)

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_written_at = trainer.global_step

    def on_validation_end(self, trainer, module) -> None:
        super().on_validation_end(trainer, module)
        if (
            not self.save_last
            or trainer.sanity_checking
            or bool(trainer.fast_dev_run)
            or getattr(self, "_last_written_at", None) == trainer.global_step
            or trainer.global_step == 0
        ):
            return
        from lightning.pytorch.trainer.states import TrainerFn

        if trainer.state.fn != TrainerFn.FITTING:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
