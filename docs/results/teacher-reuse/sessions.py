"""Two co-work sessions answered by a running `onthejob serve` (the real model), through the
official openai client, then approved: the nightly check's briefings (docs/results/nightly/
setup_sessions.py: five SEAL SQuAD dev passages each, about 800 tokens), but every answer is
the model's own, so the server keeps its top-k log-probs. Short follow-up turns are what
consolidation replays (learn/practice.py), with the answers they got as teacher rows.

    python docs/results/teacher-reuse/sessions.py --base http://127.0.0.1:8765/v1 --key KEY [--data FILE]
"""

from __future__ import annotations

import argparse
import json

import httpx
import openai

FOLLOW_UPS = ("Good. Which topics does it cover?",
              "Which of these topics would you read about first, and why?",
              "Give me one fact from the briefing that surprised you.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the server's /v1 URL")
    parser.add_argument("--key", required=True, help="a tenant's API key")
    parser.add_argument("--data", default="../shared/data/squad_seal_val.json")
    parser.add_argument("--max-tokens", type=int, default=256,
                        help="per answer (default 256, the server's default); an answer cut "
                        "there did not end its turn, and is scored again, not reused")
    parser.add_argument("--passages", type=int, default=5,
                        help="passages per briefing (default 5, as the nightly check)")
    args = parser.parse_args()
    data = json.load(open(args.data))
    picked = [data[i] for i in range(10, 200, 19)]  # as setup_sessions.py
    client = openai.OpenAI(base_url=args.base, api_key=args.key, max_retries=0, timeout=900)
    auth = {"Authorization": f"Bearer {args.key}"}
    for k in range(2):
        docs = picked[5 * k: 5 * k + args.passages]
        text = "\n\n".join(d["context"] for d in docs)
        history = [{"role": "user",
                    "content": "Here is a briefing I need you to know for our work:\n\n" + text}]
        sid = None
        for turn in (None, *FOLLOW_UPS):
            if turn is not None:
                history.append({"role": "user", "content": turn})
            raw = client.chat.completions.with_raw_response.create(
                model="default", messages=history, max_tokens=args.max_tokens, temperature=0.7,
                seed=k, extra_headers={"X-Session-Id": sid} if sid else {})
            sid = raw.headers["x-session-id"]
            reply = raw.parse().choices[0]
            history.append({"role": "assistant", "content": reply.message.content})
            print(f"session {k} turn {len(history) // 2}: {reply.finish_reason}, "
                  f"{raw.parse().usage.completion_tokens} tokens", flush=True)
        base = args.base.removesuffix("/v1")
        httpx.post(f"{base}/v1/sessions/{sid}/review", headers=auth,
                   json={"verdict": "up", "text": "Keep these facts."}).raise_for_status()
        httpx.post(f"{base}/v1/sessions/{sid}/end", headers=auth).raise_for_status()
        print(sid, [d["title"] for d in docs], len(text.split()), "words", flush=True)


if __name__ == "__main__":
    main()
