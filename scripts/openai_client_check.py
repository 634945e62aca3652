"""`memsteer serve` driven by the official `openai` Python client (run by scripts/openai-check.sh).

Usage: python openai_client_check.py BASE_URL MODEL STEER
Checks completions, chat, streaming, one steer at three strengths and an unknown steer; exits non-zero
with a message on the first difference.
"""

import sys

import openai
from openai import OpenAI


def main() -> None:
    base_url, model, steer = sys.argv[1:4]
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)

    listed = client.models.list()
    assert [m.id for m in listed.data] == [model], listed

    # Completions: greedy, at three strengths of the steer and without it.
    texts = {}
    for strength in (-20.0, 0.0, 20.0, None):
        extra = {} if strength is None else {"steer": [{"name": steer, "strength": strength}]}
        r = client.completions.create(model=model, prompt="The food was", max_tokens=8, temperature=0,
                                      extra_body=extra)
        assert r.choices[0].finish_reason in ("stop", "length"), r
        assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens >= 1, r
        again = client.completions.create(model=model, prompt="The food was", max_tokens=8, temperature=0,
                                          extra_body=extra)
        assert again.choices[0].text == r.choices[0].text, (r, again)
        texts[strength] = r.choices[0].text
    assert texts[-20.0] != texts[20.0], texts

    # Several choices with a seed give the same texts every time.
    a = client.completions.create(model=model, prompt=["A", "B"], max_tokens=6, n=2, seed=5, temperature=1.0)
    b = client.completions.create(model=model, prompt=["A", "B"], max_tokens=6, n=2, seed=5, temperature=1.0)
    assert len(a.choices) == 4 and [c.text for c in a.choices] == [c.text for c in b.choices], (a, b)

    # Chat, whole and streamed: the same text.
    messages = [{"role": "user", "content": "Tell me about the food."}]
    steer_body = {"steer": [{"name": steer, "strength": 20.0}]}
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                           extra_body=steer_body)
    assert whole.choices[0].message.role == "assistant", whole
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body=steer_body)
    pieces, usage = [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
    assert "".join(pieces) == whole.choices[0].message.content, (pieces, whole)
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens, (usage, whole.usage)

    # Completions streamed.
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=model, prompt="The food was", max_tokens=8, temperature=0,
                                           stream=True)
        if c.choices
    )
    assert streamed == texts[None], (streamed, texts[None])

    # An unknown steer is a 400 that lists the loaded ones.
    try:
        client.completions.create(model=model, prompt="x", max_tokens=2,
                                  extra_body={"steer": [{"name": "nope", "strength": 1}]})
    except openai.BadRequestError as e:
        assert steer in str(e) and "nope" in str(e), e
    else:
        raise AssertionError("an unknown steer was accepted")

    print(f"openai {openai.__version__}: completions, chat, streaming, steer at -20/0/20 and an unknown steer: ok")


if __name__ == "__main__":
    main()
