"""One table of the demo sweep: per log, the recipe flags, the candidate's gate figures (read
from the demo's own store, whose folder the log names) and how many of the 2 after-questions
the candidate answered right. Usage: python table.py > summary.md"""
import json
import re
import sqlite3
from pathlib import Path

here = Path(__file__).parent
print("| run | steps | KL to base | held-back gain | general drop | reading drop | candidate names the fact | outcome |")
print("|---|---|---|---|---|---|---|---|")
for log in sorted(here.glob("*.log")):
    text = log.read_text()
    home = re.search(r"this demo's own folder (\S+)", text)
    if not home or not Path(home.group(1), "onthejob.db").exists():
        continue
    db = sqlite3.connect(Path(home.group(1), "onthejob.db"))
    row = db.execute("select metrics, status from adapters order by id").fetchone()
    if row is None:
        continue
    m, status = json.loads(row[0]), row[1]
    knows = len(re.findall(r"the rejected candidate v1 \(not served\): .*(Bluefin|40 terminals|\b40\b)", text))
    if status == "active":
        knows = int(re.search(r"learned (\d) of 2", text).group(1))
    print(f"| {log.stem} | {m['steps']} | {m['kl_to_base']:.3f} | {m['gain']:+.2f} | "
          f"{100 * m['general_drop']:.1f} of {m['general_items']} | {100 * m['retention_drop']:+.1f} | "
          f"{knows} of 2 | {status} |")
