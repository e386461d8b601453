"""Two approved co-work sessions for the nightly-job check (docs/RESULTS.md, "Consolidation as
a nightly job"): each pastes five dev passages of the SEAL SQuAD data as a briefing (about 800
tokens), gets a short answer and a thumbs-up. No model runs here.

    ONTHEJOB_HOME=/tmp/nightly python docs/results/nightly/setup_sessions.py [DATA]
"""
import json
import sys

from onthejob.store import Store

data = json.load(open(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/squad_seal_val.json"))
picked = [data[i] for i in range(10, 200, 19)]  # spread over the dev split (articles 0-199)
store = Store()
store.create_tenant("acme")
for k in range(2):
    docs = picked[5 * k: 5 * k + 5]
    text = "\n\n".join(d["context"] for d in docs)
    s = store.create_session("acme", title="briefing")
    store.add_message("acme", s.id, "user",
                      "Here is a briefing I need you to know for our work:\n\n" + text)
    store.add_message("acme", s.id, "assistant",
                      "Thank you, I have read the briefing and will keep it in mind.")
    store.add_message("acme", s.id, "user", "Good. Which topics does it cover?")
    store.add_message("acme", s.id, "assistant", ", ".join(d["title"] for d in docs) + ".")
    store.set_review("acme", s.id, "up", "Keep these facts.")
    store.end_session("acme", s.id)
    print(s.id, [d["title"] for d in docs], len(text.split()), "words")
