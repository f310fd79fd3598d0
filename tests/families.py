"""The model-family matrix: tiny random-weight models of the architectures users bring, each saved with a byte-level
BPE tokenizer trained here, a ChatML chat template and pad == eos (as SmolLM2 and the Qwen chat models ship).

    llama   untied embeddings, multi-head attention, no biases (the embedded default's architecture)
    qwen2   tied embeddings, grouped-query attention (4 query heads, 2 key/value heads), q/k/v biases
    gpt2    tied embeddings, learned absolute positions, dropout 0.1 (embedding, attention, residual)

Head size 32 everywhere (vLLM's CPU attention needs a multiple of 32). `save_family(name, path)` writes a directory
that `--model-path` takes; `chatml_tokenizer()` is the tokenizer alone."""
import functools

import torch

FAMILIES = ("llama", "qwen2", "gpt2")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus():
    words = ("the a of to and in is it you that he was for on are with as I his they be at one have this from or "
             "had by hot word but what some we can out other were all there when up use your how said an each she "
             "user assistant system answer question add sum plus equals number").split()
    lines = [f"{a}+{b}={a + b}" for a in range(0, 100, 3) for b in range(0, 100, 7)]
    lines += [" ".join(words[i: i + 7]) for i in range(0, len(words), 3)]
    lines += [f"<|im_start|>user\n{a}+{b}=<|im_end|>\n<|im_start|>assistant\n{a + b}<|im_end|>" for a in range(20)
              for b in range(20)]
    return lines * 3


@functools.cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(_corpus(), trainer)
    return t.to_str()


def chatml_tokenizer():
    """A byte-level BPE tokenizer (~400 tokens, every byte reachable) with ChatML's special tokens and template;
    eos = <|im_end|> and pad == eos."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", bos_token=None, unk_token=None,
                                  additional_special_tokens=["<|im_start|>", "<|endoftext|>"])
    tok.chat_template = CHATML
    return tok


def family_config(name: str, vocab_size: int, eos_id: int):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, eos_token_id=eos_id, bos_token_id=eos_id, pad_token_id=eos_id)
    if name == "llama":
        return LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False, **common)
    if name == "qwen2":
        return Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, **common)
    if name == "gpt2":
        return GPT2Config(n_embd=128, n_layer=2, n_head=4, n_positions=512, resid_pdrop=0.1, embd_pdrop=0.1,
                          attn_pdrop=0.1, tie_word_embeddings=True, **common)
    raise ValueError(name)


def build_family(name: str, seed: int = 0):
    """(model, tokenizer): random weights from a fixed seed."""
    from transformers import AutoModelForCausalLM

    tok = chatml_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(name, len(tok), tok.eos_token_id))
    return model, tok


def save_family(name: str, path, seed: int = 0):
    model, tok = build_family(name, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
