"""Configuration of a Loom model exported for Hugging Face `transformers` (remote code).

Written by `loom convert to-hf --remote-code`. Self-contained: needs only `transformers`.
"""

from transformers import PretrainedConfig


class LoomConfig(PretrainedConfig):
    """A Llama-shaped decoder plus Loom's inference-time techniques.

    `techniques` is a plain dict resolved at export time (block and state indices, not selectors):
      lcm: {"blocks": [...], "K", "beta", "a_max", "n_iter", "gate", "clamp", "placement"}
      scr: {"blocks": [...], "rank", "gamma", "decay", "placement"}
      cmr: {"sources": [...], "targets": [...], "rank", "readable": {"<target>": [slots]}}
    Packed-document boundaries follow `document_eos_id` (positions restart after it), as in training.
    `use_cache` (default True): generation keeps keys, values and the techniques' state in the cache.
    """

    model_type = "loom"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=None,
        head_dim=None,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        techniques=None,
        document_eos_id=3,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        use_cache=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.techniques = techniques or {}
        self.document_eos_id = document_eos_id
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
