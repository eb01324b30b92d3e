"""``nnUNetTrainerARSeg``: AR-Seg trained by ``nnUNetv2_train D CONFIG FOLD -tr nnUNetTrainerARSeg``.

One command runs both phases: the mask tokenizer (epochs ``[0, num_tokenizer_epochs)``; Dice + BCE + VQ on the
binary mask of a randomly drawn class), then the next-scale segmentor (token cross-entropy, tokenizer frozen).
Each phase has its own optimizer and LR schedule; checkpoints store the phase, so ``--c`` resumes anywhere.
Set-up once per shell: ``export nnUNet_extTrainer=$(nnUNetv2_arseg_ext_dir)``.
"""
from __future__ import annotations

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join
from nnunetv2.paths import nnUNet_raw
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_arseg.atomic import save_json_atomic, write_atomic
from nnunet_arseg.training import phases, raters, splits
from nnunet_arseg.training.pseudo_dice import teacher_forced_mask_logits
from nnunet_arseg.training.plans import arseg_architecture, rewrite_plans_for_arseg
from nnunet_arseg.training.validation import final_validation


class nnUNetTrainerARSeg(nnUNetTrainer):
    """AR-Seg as an nnU-Net trainer. Variants override the class attributes below (see ``variants.py``)."""

    arseg_arch_overrides: dict = {}  # passed to ``build_arseg_architecture`` (tokenizer/transformer sizes, ...)
    allow_mirroring_tta: bool = False  # True: nnU-Net's mirroring TTA at inference (costs 4x/8x the samples)
    use_raters: bool | None = None  # None: raters when dataset.json declares them; True: require them

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        plans = rewrite_plans_for_arseg(plans, configuration, dataset_json, self.arseg_arch_overrides)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1000
        self.num_tokenizer_epochs = 250
        self.tokenizer_lr = 1e-4
        self.segmentor_lr = 1e-4
        self.segmentor_weight_decay = 0.01
        self.lr_poly_exponent = 0.0  # AR-Seg trains both stages at a constant LR
        self.grad_clip_norm = 1.0
        self.batch_size_cap = None  # int: at most this many examples per step (small-machine variants)
        self.num_validation_samples = 8  # samples per case for summary_arseg.json
        self.enable_deep_supervision = False
        self.grad_scaler = None  # bf16 autocast on CUDA needs no loss scaling
        self._applied_phase = None
        self._rater_info = raters.rater_info(dataset_json)
        if self.use_raters and self._rater_info is None:
            raise ValueError(f"{self.__class__.__name__} needs a multi-rater dataset, but dataset.json of "
                             f"{self.plans_manager.dataset_name} has no 'arseg': {{'num_raters': R, ...}} block; "
                             f"convert the data with nnUNetv2_arseg_convert_lidc or use nnUNetTrainerARSeg")
        if self.use_raters is False:
            self._rater_info = None

    # ---------------------------------------------------------------- network
    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> torch.nn.Module:
        """ARSegNetwork from the plans (a class method so variants' overrides apply; nnU-Net calls it on the class).

        Plans that still name the stock U-Net are rewritten on the fly (without dataset.json: label-based default)."""
        arch = arseg_architecture(configuration_manager.configuration["architecture"],
                                  configuration_manager.patch_size, cls.arseg_arch_overrides)
        return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                      arch.get("_kw_requires_import", []), num_input_channels, num_output_channels,
                                      allow_init=True, deep_supervision=None)

    def set_deep_supervision_enabled(self, enabled: bool):
        pass

    def _do_i_compile(self):
        return False

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        out = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.allow_mirroring_tta:
            self.inference_allowed_mirroring_axes = None  # as nnUNetTrainerNoMirroring, but flips stay in the DA
        return out

    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()
        if self.batch_size_cap is not None:
            self.batch_size = min(self.batch_size, self.batch_size_cap)

    # ---------------------------------------------------------------- phases
    def phase_of(self, epoch: int) -> str:
        return phases.phase_of_epoch(epoch, self.num_tokenizer_epochs)

    def configure_optimizers(self, phase: str | None = None):
        """Optimizer and scheduler of ``phase`` (default: the phase of ``current_epoch``); also sets the trainable
        parameters and ``network.stage``."""
        phase = phase or self.phase_of(self.current_epoch)
        phases.set_phase_trainable(self.network, phase)
        if phase == phases.TOKENIZER:
            lr, first, n = self.tokenizer_lr, 0, self.num_tokenizer_epochs
            optimizer = phases.build_phase_optimizer(self.network, phase, lr, 0.0)
        else:
            lr, first, n = self.segmentor_lr, self.num_tokenizer_epochs, self.num_epochs - self.num_tokenizer_epochs
            optimizer = phases.build_phase_optimizer(self.network, phase, lr, self.segmentor_weight_decay)
        self._applied_phase = phase
        return optimizer, phases.PhaseLRScheduler(optimizer, lr, first, n, self.lr_poly_exponent)

    def _switch_phase(self, phase: str):
        self.print_to_log_file(f"AR-Seg: entering the {phase} phase at epoch {self.current_epoch}")
        self.optimizer, self.lr_scheduler = self.configure_optimizers(phase)
        if self.is_ddp:  # re-wrap so that DDP only tracks the parameters trained in this phase
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.network = DDP(phases.unwrap_network(self.network), device_ids=[self.local_rank])

    def on_train_epoch_start(self):
        phase = self.phase_of(self.current_epoch)
        if phase != self._applied_phase:
            self._switch_phase(phase)
        phases.unwrap_network(self.network).stage = phase
        super().on_train_epoch_start()
        self.print_to_log_file(f"AR-Seg phase: {phase}")

    # ---------------------------------------------------------------- data
    def initialize(self):
        super().initialize()
        if self._rater_info is not None:
            keys = self.dataset_class.get_identifiers(self.preprocessed_dataset_folder)
            raters.preprocess_raters(join(nnUNet_raw, self.plans_manager.dataset_name),
                                     self.preprocessed_dataset_folder, keys, self.plans_manager,
                                     self.configuration_manager, self.dataset_json, log=self.print_to_log_file)
            self.dataset_class = raters.rater_dataset_class(self.dataset_class)

    def do_split(self):
        patient_of_case = (self._rater_info or self.dataset_json.get("arseg", {})).get("patient_of_case")
        splits_file = join(self.preprocessed_dataset_folder_base, "splits_final.json")
        if self.fold != "all" and patient_of_case and not isfile(splits_file) and self.local_rank == 0:
            keys = infer_dataset_class(self.preprocessed_dataset_folder).get_identifiers(
                self.preprocessed_dataset_folder)
            self.print_to_log_file("Creating a 5-fold split grouped by patient (dataset.json['arseg'])")
            save_json_atomic(splits.patient_grouped_splits(keys, patient_of_case), splits_file)
        return super().do_split()

    # ---------------------------------------------------------------- steps
    def _class_masks(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example a uniformly drawn foreground class/region index ``cls_B`` and its binary mask ``(B, 1, *)``."""
        lm = self.label_manager
        n_cls = len(lm.foreground_regions) if lm.has_regions else len(lm.foreground_labels)
        cls_B = torch.randint(n_cls, (target.shape[0],), device=target.device)
        if lm.has_regions:  # target holds one binary channel per region (+ the ignore channel, dropped)
            mask = torch.gather(target[:, :n_cls], 1, cls_B.view(-1, *[1] * (target.ndim - 1)).expand(
                -1, 1, *target.shape[2:]))
        else:
            labels_B = torch.as_tensor(lm.foreground_labels, device=target.device)[cls_B]
            mask = target[:, :1] == labels_B.view(-1, *[1] * (target.ndim - 1))
        return mask.float(), cls_B

    def _autocast(self):
        if self.device.type == 'cuda':
            return torch.autocast('cuda', dtype=torch.bfloat16)
        return dummy_context()

    def train_step(self, batch: dict) -> dict:
        data = batch['data'].to(self.device, non_blocking=True)
        mask, cls_B = self._class_masks(batch['target'].to(self.device, non_blocking=True))
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.network(data, mask=mask, cls=cls_B)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.network.parameters() if p.requires_grad],
                                       self.grad_clip_norm)
        self.optimizer.step()
        return {'loss': loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        """Teacher-forced loss of the current phase (never sampling) and tp/fp/fn of its prediction for the drawn
        class: tokenizer phase the reconstruction, segmentor phase the teacher-forced argmax decode."""
        data = batch['data'].to(self.device, non_blocking=True)
        mask, cls_B = self._class_masks(batch['target'].to(self.device, non_blocking=True))
        with self._autocast():
            out = self.network(data, mask=mask, cls=cls_B)
            pred = teacher_forced_mask_logits(self.network, data, mask, cls_B).float() > 0
        ref = mask > 0.5
        axes = tuple(range(1, pred.ndim))
        n_cls = len(self.label_manager.foreground_regions if self.label_manager.has_regions
                    else self.label_manager.foreground_labels)
        tp, fp, fn = (np.zeros(n_cls) for _ in range(3))
        tp_B, fp_B, fn_B = ((a & b).sum(axes).cpu().numpy() for a, b in ((pred, ref), (pred, ~ref), (~pred, ref)))
        for arr, per_b in ((tp, tp_B), (fp, fp_B), (fn, fn_B)):
            np.add.at(arr, cls_B.cpu().numpy(), per_b)
        return {'loss': out["loss"].detach().float().cpu().numpy(), 'tp_hard': tp, 'fp_hard': fp, 'fn_hard': fn}

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus the phase of the stored optimizer and its scheduler, written atomically."""
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file('No checkpoint written, checkpointing is disabled')
            return
        checkpoint = {
            'network_weights': phases.unwrap_network(self.network).state_dict(),
            'optimizer_state': self.optimizer.state_dict(),
            'grad_scaler_state': None,
            'logging': self.logger.get_checkpoint(),
            '_best_ema': self._best_ema,
            'current_epoch': self.current_epoch + 1,
            'init_args': self.my_init_kwargs,
            'trainer_name': self.__class__.__name__,
            'inference_allowed_mirroring_axes': self.inference_allowed_mirroring_axes,
            'arseg_phase': self._applied_phase,
            'arseg_scheduler_state': self.lr_scheduler.state_dict(),
        }
        write_atomic(filename, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """Rebuild the optimizer of the stored phase, then restore weights, optimizer, scheduler, epoch and logs.

        Accepts a path or an already loaded dict (nnU-Net's own version fails on dicts)."""
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = torch.load(checkpoint, map_location=self.device, weights_only=False)
        phase = checkpoint.get('arseg_phase') or self.phase_of(max(checkpoint['current_epoch'] - 1, 0))
        if self.is_ddp:
            self._switch_phase(phase)
        else:
            self.optimizer, self.lr_scheduler = self.configure_optimizers(phase)
        net = phases.unwrap_network(self.network)
        net.load_state_dict({k[7:] if k.startswith('module.') else k: v
                             for k, v in checkpoint['network_weights'].items()})
        self.my_init_kwargs = checkpoint['init_args']
        self.current_epoch = checkpoint['current_epoch']
        self.logger.load_checkpoint(checkpoint['logging'])
        self._best_ema = checkpoint['_best_ema']
        self.inference_allowed_mirroring_axes = checkpoint.get('inference_allowed_mirroring_axes',
                                                               self.inference_allowed_mirroring_axes)
        self.optimizer.load_state_dict(checkpoint['optimizer_state'])
        if checkpoint.get('arseg_scheduler_state'):
            self.lr_scheduler.load_state_dict(checkpoint['arseg_scheduler_state'])
        self.print_to_log_file(f"AR-Seg: resumed at epoch {self.current_epoch} from a {phase}-phase checkpoint")

    # ---------------------------------------------------------------- final validation
    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation with each case sampled once (``validation.py``); with raters, also
        ``summary_arseg.json`` from the same samples."""
        final_validation(self, self.num_validation_samples, self._rater_info is not None, save_probabilities)

