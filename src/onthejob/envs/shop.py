"""`shop`: a cloned web shop held in-process, with tasks checked against its database.

Pages: home, search results, product, cart, address, shipping, payment, review,
confirmation. Action language (one action per step; the first line that parses is used):

    search QUERY          click ID              type FIELD TEXT        select FIELD VALUE

IDs are the `id` attributes on the page (home, cart, p07, add-to-cart, remove-p07,
checkout, continue, place-order); FIELDs are name, street, city, zip, card, quantity,
shipping. Placing the order ends the episode. Reward: 1 when the order in the database is
exactly the task's (items and quantities, address, shipping method, card), else 0. With
`partial=True` the reward is the share of those four parts that match (0, .25, ... 1).
Running out of steps (`max_steps`, default 60) ends the episode with reward 0.

`start` is a curriculum knob: "home" (the default, the whole task) or a later page of the
checkout ("address", "shipping", "payment", "review"), reached with everything before it
already done as the task asks (the right item and quantity in the cart; the address, the
shipping method and the card filled in for the pages past them). The checker is the same.
"""

from __future__ import annotations

from onthejob.envs.base import Env, EnvError, StepResult
from onthejob.envs.shop_world import BY_ID, FIELDS, SHIPPING, luhn_ok, make_task, render, search

_EMPTY_FORM = ("", "", "", "", "")
# state = (seed, page, arg, cart, form, shipping, orders, steps, done, message)
_SEED, _PAGE, _ARG, _CART, _FORM, _SHIP, _ORDERS, _STEPS, _DONE, _MSG = range(10)


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def score_order(order: tuple, task) -> tuple[float, float]:
    """(exact reward, partial reward) of a placed order against the task."""
    cart, address, shipping, card = order
    parts = (
        cart == ((task.pid, task.quantity),),
        tuple(_norm(a) for a in address) == tuple(_norm(a) for a in task.address),
        shipping == task.shipping,
        card.replace(" ", "") == task.card,
    )
    return float(all(parts)), sum(parts) / len(parts)


class ShopEnv(Env):
    name = "shop"
    version = "1"

    def __init__(self, max_steps: int = 60, partial: bool = False, start: str = "home") -> None:
        if start not in STARTS:
            raise EnvError(f"start must be one of {', '.join(STARTS)}, not {start!r}")
        # The default start stays out of the identity (old logs keep their hashes).
        super().__init__(max_steps=max_steps, partial=partial,
                         **({"start": start} if start != "home" else {}))
        self.max_steps, self.partial, self.start = max_steps, partial, start
        self._s: tuple | None = None

    def reset(self, seed: int) -> str:
        if self.start == "home":
            self._s = (seed, "home", "", (), _EMPTY_FORM, "", (), 0, False, "")
            return self.observation()
        task = make_task(seed)
        past = STARTS.index(self.start)  # 1 address, 2 shipping, 3 payment, 4 review
        form = (*(task.address if past > 1 else ("",) * 4), task.card if past > 3 else "")
        self._s = (seed, self.start, "", ((task.pid, task.quantity),), form,
                   task.shipping if past > 2 else "", (), 0, False, "")
        return self.observation()

    def observation(self) -> str:
        s = self._s
        return render(make_task(s[_SEED]), s[_PAGE], s[_ARG], s[_CART], s[_FORM], s[_SHIP],
                      s[_ORDERS], s[_MSG])

    def snapshot(self) -> tuple | None:
        return self._s

    def restore(self, state: tuple | None) -> None:
        self._s = state

    @property
    def orders(self) -> tuple:
        """The shop's order table: (cart, address, shipping, card) per placed order."""
        return self._s[_ORDERS] if self._s else ()

    def step(self, action: str) -> StepResult:
        if self._s is None:
            raise EnvError("call reset(seed) before step()")
        if self._s[_DONE]:
            raise EnvError("the episode is over: call reset(seed)")
        changes, reward, done = self._apply(_parse(action))
        steps = self._s[_STEPS] + 1
        out_of_steps = not done and steps >= self.max_steps
        if out_of_steps:
            done, changes["message"] = True, "out of steps: the session has ended"
        s = list(self._s)
        s[_STEPS], s[_DONE], s[_MSG] = steps, done, changes.pop("message", "")
        for key, value in changes.items():
            s[_FIELD_INDEX[key]] = value
        self._s = tuple(s)
        info = {"page": self._s[_PAGE], **({"truncated": True} if out_of_steps else {})}
        return StepResult(self.observation(), reward, done, info)

    def _apply(self, parsed: tuple[str, str, str] | None) -> tuple[dict, float, bool]:
        if parsed is None:
            return {"message": "error: unknown action; use search, click, type or select"}, 0.0, False
        verb, target, text = parsed
        s = self._s
        page = s[_PAGE]
        if verb == "search":
            return {"page": "results", "arg": text}, 0.0, False
        if verb == "click":
            return self._click(target, page)
        if verb == "type" and target in FIELDS:
            if (page, target == "card") not in (("address", False), ("payment", True)):
                return {"message": f"error: there is no field {target} on this page"}, 0.0, False
            form = list(s[_FORM])
            form[FIELDS.index(target)] = text
            return {"form": tuple(form)}, 0.0, False
        if verb == "select" and target == "quantity" and page == "product":
            if text not in ("1", "2", "3", "4", "5"):
                return {"message": "error: quantity must be 1 to 5"}, 0.0, False
            return {"arg": s[_ARG].split(":")[0] + ":" + text}, 0.0, False
        if verb == "select" and target == "shipping" and page == "shipping":
            if text not in SHIPPING:
                return {"message": f"error: shipping must be one of {', '.join(SHIPPING)}"}, 0.0, False
            return {"shipping": text}, 0.0, False
        return {"message": f"error: cannot {verb} {target} on the {page} page"}, 0.0, False

    def _click(self, target: str, page: str) -> tuple[dict, float, bool]:
        s = self._s
        if target == "home":
            return {"page": "home", "arg": ""}, 0.0, False
        if target == "cart":
            return {"page": "cart", "arg": ""}, 0.0, False
        if page == "results" and target in BY_ID and any(p.pid == target for p in search(s[_ARG])):
            return {"page": "product", "arg": target + ":1"}, 0.0, False
        if page == "product" and target == "add-to-cart":
            pid, quantity = s[_ARG].split(":")
            cart = dict(s[_CART])
            cart[pid] = cart.get(pid, 0) + int(quantity)
            return {"cart": tuple(sorted(cart.items())), "message": "added to cart"}, 0.0, False
        if page == "cart" and target.startswith("remove-"):
            cart = tuple(item for item in s[_CART] if item[0] != target[len("remove-"):])
            return {"cart": cart}, 0.0, False
        if page == "cart" and target == "checkout":
            if not s[_CART]:
                return {"message": "error: the cart is empty"}, 0.0, False
            return {"page": "address"}, 0.0, False
        if target == "continue" and page in _NEXT:
            problem = self._missing(page)
            if problem:
                return {"message": f"error: {problem}"}, 0.0, False
            return {"page": _NEXT[page]}, 0.0, False
        if page == "review" and target == "place-order":
            order = (s[_CART], s[_FORM][:4], s[_SHIP], s[_FORM][4])
            exact, partial = score_order(order, make_task(s[_SEED]))
            order_id = f"A{len(s[_ORDERS]) + 1:04d}"
            return ({"orders": s[_ORDERS] + (order,), "page": "confirmation", "arg": order_id},
                    partial if self.partial else exact, True)
        return {"message": f"error: there is no {target} to click on the {page} page"}, 0.0, False

    def _missing(self, page: str) -> str:
        s = self._s
        if page == "address":
            empty = [f for f, v in zip(FIELDS[:4], s[_FORM][:4], strict=True) if not v.strip()]
            return f"please fill in {', '.join(empty)}" if empty else ""
        if page == "shipping":
            return "" if s[_SHIP] else "please select a shipping method"
        return "" if luhn_ok(s[_FORM][4]) else "the card number is not valid"


STARTS = ("home", "address", "shipping", "payment", "review")
_NEXT = {"address": "shipping", "shipping": "payment", "payment": "review"}
_FIELD_INDEX = {"page": _PAGE, "arg": _ARG, "cart": _CART, "form": _FORM,
                "shipping": _SHIP, "orders": _ORDERS}
_VERBS = ("search", "click", "type", "select")


def _parse(action: str) -> tuple[str, str, str] | None:
    """(verb, target, text) from the first line that is an action, or None."""
    for line in action.strip().splitlines():
        parts = line.strip().split(None, 2)
        if not parts or parts[0].lower() not in _VERBS:
            continue
        verb = parts[0].lower()
        if verb == "search":
            query = line.strip()[len("search"):].strip()
            return ("search", "", query) if query else None
        if verb == "click" and len(parts) >= 2:
            return ("click", parts[1], "")
        if verb in ("type", "select") and len(parts) == 3:
            return (verb, parts[1].lower(), parts[2].strip())
        return None
    return None
