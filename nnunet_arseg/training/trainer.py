"""``nnUNetTrainerARSeg``: AR-Seg trained by ``nnUNetv2_train D CONFIG FOLD -tr nnUNetTrainerARSeg``.

Before the first epoch the trainer makes sure the dataset's mask tokenizer exists (``tokenizer_store``: trained once
per dataset, plans and configuration until it reconstructs held-out masks, shared by every fold and variant) and
loads it, frozen. Every epoch then trains the next-scale segmentor: the plans' U-Net (its decoder as a dense
auxiliary head), the image embedding and the transformer, with token cross-entropy. ``--c`` resumes the tokenizer's
training or the epochs; ``-pretrained_weights`` of a stock nnU-Net model initialises the U-Net.
Set-up once per shell: ``export nnUNet_extTrainer=$(nnUNetv2_arseg_ext_dir)``.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_arseg.atomic import write_atomic
from nnunet_arseg.network import unwrap_network
from nnunet_arseg.tokenizer.fit import TokenizerFitConfig
from nnunet_arseg.training import ddp, tokenizer_store
from nnunet_arseg.training.base import MultiRaterTrainerBase
from nnunet_arseg.training.plans import arseg_architecture, rewrite_plans_for_arseg, tokenizer_widths
from nnunet_arseg.training.schedules import WarmupCosineLR, build_optimizer
from nnunet_arseg.training.validation import final_validation, foreground_classes


class nnUNetTrainerARSeg(MultiRaterTrainerBase):
    """AR-Seg as an nnU-Net trainer. Variants override the class attributes below and of ``MultiRaterTrainerBase``
    (see ``variants.py``)."""

    arseg_arch_overrides: dict = {}  # passed to ``build_arseg_architecture`` (tokenizer/transformer sizes, ...)
    freeze_encoder: bool = False  # True: the image encoder keeps its (pretrained) weights and runs without backward
    tokenizer_fit: TokenizerFitConfig = TokenizerFitConfig()

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        self.tokenizer = self._resolve_tokenizer(plans, configuration, dataset_json)
        overrides = {**self.arseg_arch_overrides, "tokenizer": self.tokenizer.arch_kwargs}
        plans = rewrite_plans_for_arseg(plans, configuration, dataset_json, overrides)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1000
        self.initial_lr = 3e-4
        self.weight_decay = 0.01
        self.warmup_epochs = 5
        self.grad_clip_norm = 1.0
        self._tokenizer_loaded = False

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

    def configure_optimizers(self):
        """AdamW over what the segmentor trains, warm-up then cosine decay over ``num_epochs``."""
        net = unwrap_network(self.network)
        params = net.trainable_parameters(self.freeze_encoder)
        if self.freeze_encoder:
            net.encoder.requires_grad_(False)
        optimizer = build_optimizer(net, params, self.initial_lr, self.weight_decay)
        return optimizer, WarmupCosineLR(optimizer, self.initial_lr, self.num_epochs, self.warmup_epochs)

    def initialize(self):
        super().initialize()
        # nnU-Net's -pretrained_weights loader, which runs right after initialize(), requires every key of
        # self.network to be in the file. Until training starts, self.network is therefore the U-Net part alone
        # (the same modules): a stock nnU-Net checkpoint of the same plans initialises it.
        self._arseg_network, self.network = self.network, unwrap_network(self.network).image_model()
        self._image_model_at_init = {k: v.clone() for k, v in self.network.state_dict().items()}

    def _restore_network(self) -> None:
        """Put the whole AR-Seg network back in place of the U-Net view (see ``initialize``)."""
        if getattr(self, "_arseg_network", None) is None:
            return
        at_init = self._image_model_at_init
        loaded = [k for k, v in self.network.state_dict().items() if not torch.equal(v, at_init[k])]
        if loaded:
            parts = sorted({k.split(".")[0] for k in loaded})
            fresh = sorted({k.split(".")[0] for k, _ in unwrap_network(self._arseg_network).named_parameters()}
                           - {"encoder", "decoder", "tokenizer"})
            unloaded = sorted({k.rsplit(".", 2)[0] for k in at_init if k not in loaded})
            self.print_to_log_file(
                f"AR-Seg: {len(loaded)} of {len(at_init)} U-Net tensors ({', '.join(parts)}) were loaded from the "
                f"pretrained weights" + (f"; not loaded, as initialised: {', '.join(unloaded)}" if unloaded else "") +
                f"; not in a stock checkpoint and trained from scratch: {', '.join(fresh)}; the tokenizer is the "
                f"dataset's own")
        elif self.freeze_encoder:
            self.print_to_log_file(f"AR-Seg: WARNING {type(self).__name__} keeps its encoder frozen, but no pretrained "
                                   f"weights were loaded into it: pass -pretrained_weights <a stock nnUNetTrainer "
                                   f"checkpoint_final.pth of the same dataset and plans>")
        self.network, self._arseg_network, self._image_model_at_init = self._arseg_network, None, None

    # ---------------------------------------------------------------- tokenizer
    def _resolve_tokenizer(self, plans: dict, configuration: str,
                           dataset_json: dict) -> tokenizer_store.DatasetTokenizer:
        pm = PlansManager(plans)
        cm = pm.get_configuration(configuration)
        folder = join(nnUNet_preprocessed, pm.dataset_name, cm.data_identifier)

        def object_extent():
            # from the preprocessed label maps, never the raters: those may still be being written by another fold,
            # and the stride must not depend on whether they are (a resumed run would build another tokenizer)
            lm = pm.get_label_manager(dataset_json)
            keys = tokenizer_store.sizing_cases(infer_dataset_class(folder).get_identifiers(folder))
            source = tokenizer_store.PreprocessedMasks(folder, keys, infer_dataset_class(folder), lm, cm.patch_size,
                                                       with_raters=False)
            return tokenizer_store.median_object_extent((m for k in keys for m in source.label_maps(k)[0]),
                                                        foreground_classes(lm))

        return tokenizer_store.resolve_dataset_tokenizer(join(nnUNet_results, pm.dataset_name), pm.plans_name,
                                                         configuration, cm.patch_size, cm.spacing,
                                                         tokenizer_widths(self.arseg_arch_overrides), object_extent)

    def load_tokenizer(self) -> None:
        """Train the dataset's tokenizer if it does not exist yet (under DDP rank 0 alone, while the other ranks wait),
        then load it into the network (frozen)."""
        patient_of_case = (self._rater_info or self.dataset_json.get("arseg", {})).get("patient_of_case")
        keys = self.dataset_class.get_identifiers(self.preprocessed_dataset_folder)
        train_keys, heldout_keys = tokenizer_store.split_heldout(keys, patient_of_case)
        lm, patch = self.label_manager, self.configuration_manager.patch_size

        def source(k):
            return tokenizer_store.PreprocessedMasks(self.preprocessed_dataset_folder, k, self.dataset_class, lm, patch,
                                                     self._rater_info is not None)

        stored = ddp.rank0_first(lambda: tokenizer_store.train_dataset_tokenizer(
            self.tokenizer, patch, source(train_keys), source(heldout_keys), self.tokenizer_fit, self.device,
            log=self.print_to_log_file))
        full = self._arseg_network if getattr(self, "_arseg_network", None) is not None else self.network
        unwrap_network(full).tokenizer.load_state_dict(stored["state_dict"])
        self.print_to_log_file(f"AR-Seg: tokenizer {self.tokenizer.path} loaded (held-out Dice "
                               f"{stored['summary']['heldout']['dice_nonempty']:.4f})")
        self._tokenizer_loaded = True

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        self._restore_network()
        if not self._tokenizer_loaded:
            self.load_tokenizer()
        super().on_train_start()  # seeds the batches, whether or not the tokenizer was trained first

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

    def presence_targets(self, batch: dict, cls_B: torch.Tensor) -> torch.Tensor | None:
        """The presence BCE's target per example (B,) in [0, 1]; None: whether the drawn mask is non-empty."""
        return None

    def train_step(self, batch: dict) -> dict:
        """One step of token cross-entropy (+ the aux and presence terms)."""
        data = batch['data'].to(self.device, non_blocking=True)
        mask, cls_B = self._class_masks(batch['target'].to(self.device, non_blocking=True))
        presence_B = self.presence_targets(batch, cls_B)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.network(data, mask=mask, cls=cls_B, presence_target=presence_B)["loss"]
        self._backward_and_step(loss)
        return {'loss': loss.detach().float().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        """Teacher-forced loss and tp/fp/fn of the per-token argmax decode for the drawn class (never sampling)."""
        data = batch['data'].to(self.device, non_blocking=True)
        mask, cls_B = self._class_masks(batch['target'].to(self.device, non_blocking=True))
        with self._autocast():
            out = self.network(data, mask=mask, cls=cls_B, with_prediction=True)
        pred, ref = out["prediction"].float() > 0, mask > 0.5
        axes = tuple(range(1, pred.ndim))
        n_cls = len(foreground_classes(self.label_manager))
        tp, fp, fn, drawn = (np.zeros(n_cls) for _ in range(4))
        tp_B, fp_B, fn_B = ((a & b).sum(axes).cpu().numpy() for a, b in ((pred, ref), (pred, ~ref), (~pred, ref)))
        for arr, per_b in ((tp, tp_B), (fp, fp_B), (fn, fn_B), (drawn, np.ones(len(cls_B)))):
            np.add.at(arr, cls_B.cpu().numpy(), per_b)
        return {'loss': out["loss"].detach().float().cpu().numpy(), 'tp_hard': tp, 'fp_hard': fp, 'fn_hard': fn,
                'drawn': drawn}

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written atomically (an interrupted write never leaves a truncated checkpoint)."""
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file('No checkpoint written, checkpointing is disabled')
            return
        checkpoint = {
            'network_weights': unwrap_network(self.network).state_dict(),
            'optimizer_state': self.optimizer.state_dict(),
            'grad_scaler_state': self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            'logging': self.logger.get_checkpoint(),
            '_best_ema': self._best_ema,
            'current_epoch': self.current_epoch + 1,
            'init_args': self.my_init_kwargs,
            'trainer_name': self.__class__.__name__,
            'inference_allowed_mirroring_axes': self.inference_allowed_mirroring_axes,
            'arseg_tokenizer': self.tokenizer.path,
        }
        self.refuse_nonfinite_weights(filename)
        write_atomic(filename, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """nnU-Net's checkpoint loading, for paths and already loaded dicts; the tokenizer travels in the weights.
        The loss scale is restored where both the run and the checkpoint use fp16 (a bf16 run's has none)."""
        if not self.was_initialized:
            self.initialize()
        self._restore_network()
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = torch.load(checkpoint, map_location=self.device, weights_only=False)
        tokenizer_store.check_checkpoint_tokenizer(checkpoint, self.tokenizer, unwrap_network(self.network).tokenizer)
        unwrap_network(self.network).load_state_dict({k[7:] if k.startswith('module.') else k: v
                                                      for k, v in checkpoint['network_weights'].items()})
        self.my_init_kwargs = checkpoint['init_args']
        self.current_epoch = checkpoint['current_epoch']
        self.logger.load_checkpoint(checkpoint['logging'])
        self._best_ema = checkpoint['_best_ema']
        self.inference_allowed_mirroring_axes = checkpoint.get('inference_allowed_mirroring_axes',
                                                               self.inference_allowed_mirroring_axes)
        self.optimizer.load_state_dict(checkpoint['optimizer_state'])
        if self.grad_scaler is not None and checkpoint.get('grad_scaler_state') is not None:
            self.grad_scaler.load_state_dict(checkpoint['grad_scaler_state'])
        self._tokenizer_loaded = True
        if isinstance(filename_or_checkpoint, str):
            self.print_to_log_file(f"AR-Seg: {os.path.basename(filename_or_checkpoint)} loaded, {self.current_epoch} "
                                   f"of {self.num_epochs} epochs done")

    # ---------------------------------------------------------------- final validation
    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation with each case sampled once (``validation.py``); with raters, also
        ``summary_arseg.json`` from the same samples."""
        self._restore_network()
        final_validation(self, self.num_validation_samples, self._rater_info is not None, save_probabilities)
