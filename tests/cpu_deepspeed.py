"""vlmtrain's DeepSpeed strategy (Lightning's, resuming with weights_only) allowed on CPU processes (DS_ACCELERATOR=cpu, gloo): for tests only."""
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy

from vlmtrain.training.strategies import SafeDeepSpeedStrategy


class CPUDeepSpeedStrategy(SafeDeepSpeedStrategy):
    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # Lightning's check refuses CPUs; DeepSpeed itself runs there

    def setup_distributed(self) -> None:  # without the check of CUDA device indices
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self):
        import torch

        return torch.device("cpu", self.local_rank)  # DeepSpeed reads the index as its device rank
