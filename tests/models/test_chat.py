"""Chat templates render as Hugging Face's ``apply_chat_template`` renders them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers

from models.chat import DEFAULT_TEMPLATE, ChatTemplate, ChatTemplateError, load_chat_template
from train.data import chat_prompt

# Templates in the styles checkpoints ship: ChatML with a loop-scoped namespace and
# tojson, and Llama-2's, which reads bos/eos tokens and refuses roles out of order.
CHATML = (
    "{% set ns = namespace(n=0) %}"
    "{% for message in messages %}{% set ns.n = ns.n + 1 %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    "{# {{ ns.n }} messages #}{{ {'k': 'é<'} | tojson }}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": " 4 "}, {"role": "user", "content": "  and 3+3?\n"}],
]


def _checkpoint(tmp_path: Path, tokenizer_path: Path, template: str) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(tokenizer_path, d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template,
        "bos_token": {"content": "<|endoftext|>", "__type": "AddedToken"},
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    return d


@pytest.mark.parametrize("template", [CHATML, LLAMA2], ids=["chatml", "llama2"])
def test_checkpoint_template_equals_hf(tmp_path, tokenizer_path, template) -> None:
    d = _checkpoint(tmp_path, tokenizer_path, template)
    ours = load_chat_template(d)
    assert ours.source.endswith("tokenizer_config.json")
    hf = transformers.AutoTokenizer.from_pretrained(d)
    for chat in CHATS:
        want = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert ours.render(chat) == want


def test_template_errors_and_sandbox(tmp_path, tokenizer_path) -> None:
    t = load_chat_template(_checkpoint(tmp_path, tokenizer_path, LLAMA2))
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        t.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    # The sandbox: no attribute walk to Python internals.
    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        evil.render(CHATS[0])
    with pytest.raises(ValueError, match="line 1"):
        ChatTemplate("{% for %}", source="bad.jinja")


def test_default_template_and_override_file(tmp_path) -> None:
    t = load_chat_template(None)
    assert t.source == "default" and t.text == DEFAULT_TEMPLATE
    assert t.render(CHATS[1]) == ("System: Be terse.\n\nUser: 2+2?\n\nAssistant:  4 "
                                  "<|endoftext|>\n\nUser:   and 3+3?\n\n\nAssistant:")
    # The transcript `neoxq finetune` trains chat data in: a fine-tuned model is
    # prompted as it was trained.
    for chat in CHATS:
        assert t.render(chat) == chat_prompt(chat)
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}>")
    assert load_chat_template("tiny", template_file=f).render(CHATS[0]) == "[user] Hi\n>"
    with pytest.raises(FileNotFoundError):
        load_chat_template(None, template_file=tmp_path / "missing.jinja")
    # chat_template.jinja beside the checkpoint wins over the default.
    (tmp_path / "chat_template.jinja").write_text("<{{ messages[0].content }}>")
    assert load_chat_template(tmp_path).render(CHATS[0]) == "<Hi>"
