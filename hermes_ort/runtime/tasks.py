"""What a model is used for beyond a pass: chat with an instruct decoder and embed sentences with
an encoder, written once over `generate` and `run` for every model that has them (one board, and
the cluster's model over several)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


class ChatAndEmbed:
    """Mixin: needs `model_dir`, `manifest`, `decoder`, `generate(...)` and `run(feeds)`."""

    def chat(
        self,
        messages: Any,
        max_new_tokens: int = 256,
        system: str | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        streamer: Callable[[str], Any] | None = None,
    ) -> str:
        """The assistant's reply to `messages` ([{"role": "user", "content": "..."}, ...], or
        one user message as a str), with `system` as the first message if given: the
        conversation rendered by the model directory's chat template (as transformers'
        `apply_chat_template` with add_generation_prompt), generated until the end-of-turn token
        (generation_config.json's eos ids and the tokenizer's eos token) or max_new_tokens
        (fewer if the model's positions run out), and decoded. streamer(text) is called with
        each piece of the reply as it becomes whole. Needs a chat template (TokenizerError) and
        `jinja2` (the `text` extra); `generation_stats` describes the turn."""
        from hermes_ort.generation.chat import chat_reply

        sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
        return chat_reply(
            self.model_dir,
            self.decoder,
            self.generate,
            messages,
            max_new_tokens,
            system,
            {**sampling, "seed": seed},
            streamer,
        )

    def embed(self, texts: Any, normalize: bool | None = None, batch_size: int = 32) -> np.ndarray:
        """Sentence embeddings [len(texts), dim] float32 of `texts` (a list of str, or one str)
        with an encoder exported for feature-extraction, as sentence-transformers' `encode`:
        tokenized (cut to the checkpoint's max_seq_length), run `batch_size` texts per pass,
        pooled as the directory's modules.json and Pooling config say (else mean pooling, with
        a `PoolingNotDeclared` warning); normalize: None as declared, else forced on or off.
        `stats` describes the last pass."""
        from hermes_ort.runtime.embedding import embed_texts

        return embed_texts(self.model_dir, self.manifest, self.run, texts, normalize, batch_size)
