"""Model resolution and loading: a name or folder in, a described model out."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from engine.common.errors import ModelError
from engine.models.builtin import BUILTIN_MODELS, builtin_model_folder
from engine.models.config import ModelConfig
from engine.models.controlnet import (
    CONTROLLED_UNET,
    ControlledUNetModule,
    controlled_unet_spec,
    controlnet_component,
    controlnet_spec,
    load_controlnet,
    mismatches,
    read_controlnet_config,
)
from engine.models.family import ModelFamily
from engine.models.flux import Flux
from engine.models.flux_variants import VARIANTS, flux_variant
from engine.models.ip_adapter import (
    IMAGE_ENCODER_PREFIX,
    IP_DENOISERS,
    PROJECTION_PREFIX,
    AdapterLayout,
    ImageEncoderModule,
    IPAdapterDenoiser,
    image_encoder_spec,
    ip_denoiser_spec,
    load_projection,
    projection_spec,
    split_state,
)
from engine.models.sd import StableDiffusion
from engine.models.sd3 import StableDiffusion3
from engine.models.sdxl import StableDiffusionXL
from engine.models.sources import ModelLocation, ModelSource, is_hub_id, local_folder, locate_hub_model
from engine.settings import RUNPOD_MODEL_CACHE as MODEL_CACHE
from engine.spec import ComponentSpec

log = logging.getLogger(__name__)

FAMILIES: tuple[ModelFamily, ...] = (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), *VARIANTS)
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def family_for(pipeline_class: str) -> ModelFamily:
    for family in FAMILIES:
        if pipeline_class in family.pipeline_classes:
            return family
    known = ", ".join(name for family in FAMILIES for name in family.pipeline_classes)
    raise ModelError(f"unsupported pipeline {pipeline_class!r}; supported: {known}")


def locate_model(
    name: str, cache_dir: Path, revision: str | None = None, model_cache: Path = MODEL_CACHE
) -> ModelLocation:
    """A built-in name, a hub id (RunPod's model cache, a local folder of that name, or a download), or a local
    diffusers folder; with where it was found."""
    if name in BUILTIN_MODELS:
        return ModelLocation(builtin_model_folder(name, cache_dir), ModelSource.BUILTIN)
    if is_hub_id(name):
        return locate_hub_model(name, model_cache, revision)
    path = Path(name).expanduser()
    if path.exists():
        return ModelLocation(local_folder(path), ModelSource.FOLDER)
    builtins = ", ".join(BUILTIN_MODELS)
    raise ModelError(
        f"MODEL={name}: not a built-in model ({builtins}), an existing diffusers folder, or a hub id (owner/name)"
    )


def resolve_model_folder(
    name: str, cache_dir: Path, revision: str | None = None, model_cache: Path = MODEL_CACHE
) -> Path:
    """The folder ``locate_model`` finds."""
    return locate_model(name, cache_dir, revision, model_cache).folder


@dataclass
class Model:
    """A model folder with its family, configs and one spec per component."""

    name: str
    folder: Path
    family: ModelFamily
    config: ModelConfig
    source: ModelSource = ModelSource.FOLDER
    """Where the folder was found: built in, RunPod's model cache, a local folder, or the hub."""
    controlnets: dict[str, Path] = field(default_factory=dict)
    """Components added for ControlNets (``controlnet.<name>``), each with its folder."""
    ip_files: dict[str, Path] = field(default_factory=dict)
    """Components added for IP-Adapters' projections (``ip_projection.<name>``), each with its file."""
    image_encoders: dict[str, Path] = field(default_factory=dict)
    """Components added for IP-Adapters' image encoders (``image_encoder.<folder>-<fingerprint>``), with their
    folders."""

    @cached_property
    def specs(self) -> dict[str, ComponentSpec]:
        """The family's components, then any ControlNets added and the controlled UNet they feed."""
        return self.family.specs(self.config)

    def controlnet_mismatches(self, folder: Path) -> list[str]:
        """Why the ControlNet in ``folder`` cannot drive this model's UNet; empty when it can."""
        return mismatches(self.config.configs["unet"], read_controlnet_config(folder), self.config.latent_channels)

    def add_controlnet(self, name: str, folder: Path) -> str:
        """Makes a ControlNet folder (checked with ``controlnet_mismatches``) one of the model's
        components, with the controlled UNet; returns the component's name."""
        component = controlnet_component(name)
        unet = self.specs["unet"]
        self.specs[component] = controlnet_spec(component, unet, read_controlnet_config(folder))
        self.specs.setdefault(CONTROLLED_UNET, controlled_unet_spec(unet, self.config.configs["unet"]))
        self.controlnets[component] = folder
        return component

    @property
    def ip_layers(self) -> int:
        """The UNet's cross-attention layers: each takes an IP-Adapter's to_k_ip and to_v_ip."""
        return sum(1 for name in self._unet_shapes if name.endswith("attn2.to_k.weight"))

    @cached_property
    def meta_unet(self) -> torch.nn.Module:
        """The UNet (diffusers' ``UNet2DConditionModel``) built from its config on the meta device: its layout,
        nothing loaded."""
        return self.family.torch_module("unet", self.folder, torch.float32, weights=False).unet

    @cached_property
    def _unet_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(p.shape) for name, p in self.meta_unet.named_parameters()}

    def ip_adapter_mismatches(self, layout: AdapterLayout, layers: dict[str, torch.Tensor], encoder: Path) -> str:
        """Why an adapter (its layout and ``ip_adapter`` part) and its image encoder cannot serve this model's
        UNet, in words; empty when they can."""
        found = []
        width = self.config.configs["unet"].get("cross_attention_dim")
        if layout.cross_attention_dim != width:
            found.append(f"cross-attention width {layout.cross_attention_dim} where the UNet has {width}")
        shapes = [shape for name, shape in self._unet_shapes.items() if name.endswith("attn2.to_k.weight")]
        for index, shape in enumerate(shapes):
            for matrix in ("to_k_ip", "to_v_ip"):
                value = layers.get(f"{2 * index + 1}.{matrix}.weight")
                if value is None or tuple(value.shape) != shape:
                    key = f"ip_adapter.{2 * index + 1}.{matrix}.weight"
                    found.append(f"{key} is {_shape(value)}, the UNet needs {shape}")
        if len(layers) != 2 * len(shapes):
            found.append(f"{len(layers) // 2} IP attention layers where the UNet has {len(shapes)}")
        spec = image_encoder_spec("image_encoder", json.loads((encoder / "config.json").read_text()))
        output = spec.outputs[1 if layout.hidden_states else 0].shape[-1]
        if output != layout.embed_dim:
            found.append(f"its projection reads {layout.embed_dim} values where the image encoder gives {output}")
        return "; ".join(found[:3])

    def add_ip_adapter(
        self, name: str, file: Path, sha256: str, encoder: Path, encoder_digest: str, layout: AdapterLayout
    ) -> tuple[str, str]:
        """Makes a checked adapter's image encoder and projection components of the model, with the IP
        denoisers; returns the encoder's and the projection's component names. Each name carries its files'
        hash (the projection's file, the encoder folder's fingerprint) and the encoder's its folder's path,
        so a file replaced under the same name, or two encoders in folders of the same name, are other
        components, never one's runners serving the other."""
        folder = _component_name(Path(name).parent.as_posix()) if Path(name).parent != Path() else "root"
        encoder_component = f"{IMAGE_ENCODER_PREFIX}{folder}-{encoder_digest[:8]}"
        projection = f"{PROJECTION_PREFIX}{_component_name(name)}-{sha256[:8]}"
        encoder_spec = image_encoder_spec(encoder_component, json.loads((encoder / "config.json").read_text()))
        self.specs[encoder_component] = encoder_spec
        sequence = encoder_spec.outputs[1].shape[1]
        assert isinstance(sequence, int)
        self.specs[projection] = projection_spec(projection, layout, sequence)
        self.specs.setdefault(CONTROLLED_UNET, controlled_unet_spec(self.specs["unet"], self.config.configs["unet"]))
        for component, (slots, controlled) in IP_DENOISERS.items():
            inner = self.specs[CONTROLLED_UNET if controlled else "unet"]
            spec = ip_denoiser_spec(inner, component, layout.cross_attention_dim, self.ip_layers, slots)
            self.specs.setdefault(component, spec)
        self.image_encoders[encoder_component] = encoder
        self.ip_files[projection] = file
        return encoder_component, projection

    @property
    def added_cond_names(self) -> tuple[str, ...]:
        """The UNet's conditioning inputs after the text embeddings (SDXL's pooled embeds and time ids)."""
        return tuple(self.specs["unet"].input_names[3:])

    def component_folder(self, component: str) -> Path:
        """The folder whose files (config and weights) a component is built from."""
        if component in self.controlnets:
            return self.controlnets[component]
        if component in self.ip_files:
            return self.ip_files[component]
        if component in self.image_encoders:
            return self.image_encoders[component]
        unet = component == CONTROLLED_UNET or component in IP_DENOISERS
        return self.folder / self.family.weight_folder("unet" if unet else component)

    def torch_module(self, component: str, dtype: torch.dtype, weights: bool = True) -> torch.nn.Module:
        """The module export traces and the torch backend runs, for any component the model has."""
        if component in self.controlnets:
            return load_controlnet(self.controlnets[component], dtype, self.added_cond_names)
        if component == CONTROLLED_UNET:
            return self.controlled_unet(self.family.torch_module("unet", self.folder, dtype, weights))
        if component in IP_DENOISERS:
            return self.ip_denoiser(component, self.family.torch_module("unet", self.folder, dtype, weights))
        if component in self.image_encoders:
            from transformers import CLIPVisionModelWithProjection

            encoder = CLIPVisionModelWithProjection.from_pretrained(self.image_encoders[component], torch_dtype=dtype)
            return ImageEncoderModule(encoder.eval().requires_grad_(False))
        if component in self.ip_files:
            from safetensors.torch import load_file

            state = split_state(load_file(str(self.ip_files[component])))
            return load_projection(state["image_proj"], dtype)
        return self.family.torch_module(component, self.folder, dtype, weights)

    def ip_denoiser(self, component: str, unet: torch.nn.Module) -> torch.nn.Module:
        """An IP denoiser (``IP_DENOISERS``) on the weights of a UNet module (a fresh one, or the torch runner's)."""
        slots, controlled = IP_DENOISERS[component]
        return IPAdapterDenoiser(self.controlled_unet(unet) if controlled else unet, unet.unet, slots)

    def controlled_unet(self, unet: torch.nn.Module) -> torch.nn.Module:
        """The controlled UNet on the weights of a UNet module (a fresh one, or the torch runner's own)."""
        return ControlledUNetModule(unet.unet, self.added_cond_names)

    @cached_property
    def tokenizers(self) -> dict[str, Any]:
        from transformers import AutoTokenizer

        return {name: AutoTokenizer.from_pretrained(self.folder / name) for name in self.family.tokenizers}

    @cached_property
    def parameter_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """Each LoRA-targetable component's parameter names and shapes, from its config (nothing loaded)."""
        shapes = {}
        for component in self.family.lora_targets:
            module = self.torch_module(component, torch.float32, weights=False)
            shapes[component] = {name: tuple(p.shape) for name, p in module.named_parameters()}
        return shapes

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return self.config.configs["scheduler"]

    @property
    def components(self) -> tuple[str, ...]:
        return self.family.components

    def missing_files(self) -> list[str]:
        """What a complete folder of this family must hold and this one lacks."""
        missing = []
        subfolders = {self.family.weight_folder(c) for c in self.components}
        for sub in sorted(subfolders):
            if not (self.folder / sub / "config.json").is_file():
                missing.append(f"{sub}/config.json")
            if not any(p.suffix in WEIGHT_SUFFIXES for p in (self.folder / sub).glob("*")):
                missing.append(f"{sub}/ weights")
        for sub in (*self.family.tokenizers, "scheduler"):
            if not (self.folder / sub).is_dir():
                missing.append(f"{sub}/")
        return missing


def _component_name(name: str) -> str:
    """A name with subfolders as one component name (``models/ip-adapter_sd15`` -> ``models--ip-adapter_sd15``)."""
    return name.replace("/", "--")


def _shape(value: torch.Tensor | None) -> str:
    return "missing" if value is None else str(tuple(value.shape))


def load_model(name: str, cache_dir: Path, revision: str | None = None, model_cache: Path = MODEL_CACHE) -> Model:
    location = locate_model(name, cache_dir, revision, model_cache)
    folder = location.folder
    index = json.loads((folder / "model_index.json").read_text())
    family = family_for(index["_class_name"])
    subfolders = {family.weight_folder(c) for c in family.components} | {"scheduler"}
    config = ModelConfig.read(folder, sorted(subfolders | set(family.text_encoders)))
    missing = Model(name=name, folder=folder, family=family, config=config).missing_files()
    if missing:
        raise ModelError(f"model folder {folder} is incomplete: missing {', '.join(missing)}")
    return Model(name=name, folder=folder, family=family_of(config, family), config=config, source=location.source)


def family_of(config: ModelConfig, named: ModelFamily) -> ModelFamily:
    """The family a folder is: its pipeline class's, or for Flux, the variant its transformer's input width says."""
    return flux_variant(config) if isinstance(named, Flux) else named
