"""The web shop's world: a fixed catalog, tasks generated from a seed, and page rendering.

Everything here is immutable (tuples), so the shop's state is one tuple and a snapshot is
that tuple itself: reset, snapshot and restore cost a few microseconds.
"""

from __future__ import annotations

import functools
import random
from typing import NamedTuple

CATEGORIES = ("kettle", "mug", "toaster", "lamp", "backpack", "umbrella", "headphones", "teapot")
COLORS = ("red", "blue", "green", "black", "white", "silver")
BRANDS = ("Acme", "Borealis", "Cobalt", "Dune", "Ember", "Fjord")
SHIPPING = {"standard": 499, "express": 1499}
FIELDS = ("name", "street", "city", "zip", "card")
PEOPLE = ("Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov",
          "Donald Knuth", "Frances Allen", "Ken Thompson")
STREETS = ("12 Elm Street", "7 Harbor Road", "301 Maple Avenue", "44 Mill Lane", "9 Station Square",
           "118 Birch Way")
CITIES = (("Springfield", "12345"), ("Riverton", "20817"), ("Lakeside", "33021"),
          ("Hillview", "48210"), ("Oakdale", "57104"))
CARDS = ("4242424242424242", "4111111111111111", "5555555555554444", "4000056655665556")


class Product(NamedTuple):
    pid: str
    title: str
    category: str
    color: str
    price: int  # cents
    rating: float


class Task(NamedTuple):
    pid: str
    quantity: int
    address: tuple[str, str, str, str]  # name, street, city, zip
    shipping: str
    card: str
    text: str


def _catalog() -> tuple[Product, ...]:
    rng = random.Random("shop-catalog-1")
    products, used_prices = [], set()
    for category in CATEGORIES:
        for _ in range(12):
            price = rng.randrange(800, 6000)
            while price in used_prices:  # distinct prices: "the cheapest" is always unique
                price += 1
            used_prices.add(price)
            color, brand = rng.choice(COLORS), rng.choice(BRANDS)
            pid = f"p{len(products) + 1:02d}"
            title = f"{brand} {color.title()} {category.title()} {rng.choice('SML')}{rng.randrange(10)}"
            products.append(Product(pid, title, category, color, price, rng.randrange(20, 51) / 10))
    return tuple(products)


CATALOG = _catalog()
BY_ID = {p.pid: p for p in CATALOG}
_SEARCH_TEXT = {p.pid: f"{p.title} {p.category} {p.color}".lower() for p in CATALOG}


def _task_choices() -> tuple[tuple[str, str, int, str], ...]:
    """(color, category, limit in dollars, answer pid) for every unambiguous cheapest-X task."""
    choices = []
    for category in CATEGORIES:
        for color in COLORS:
            matches = sorted((p.price, p.pid) for p in CATALOG
                             if p.category == category and p.color == color)
            if len(matches) >= 2:
                cheapest = matches[0]
                limit = cheapest[0] // 100 + 5
                choices.append((color, category, limit, cheapest[1]))
    return tuple(choices)


TASK_CHOICES = _task_choices()


@functools.lru_cache(maxsize=8192)
def make_task(seed: int) -> Task:
    rng = random.Random(seed)
    color, category, limit, pid = rng.choice(TASK_CHOICES)
    quantity = rng.randint(1, 3)
    city, zip_code = rng.choice(CITIES)
    address = (rng.choice(PEOPLE), rng.choice(STREETS), city, zip_code)
    shipping, card = rng.choice(tuple(SHIPPING)), rng.choice(CARDS)
    text = (f"Buy {quantity} of the cheapest {color} {category} under ${limit} and ship it to "
            f"{address[0]}, {address[1]}, {address[2]}, {address[3]} by {shipping} shipping; "
            f"pay with card {card}.")
    return Task(pid, quantity, address, shipping, card, text)


def search(query: str) -> tuple[Product, ...]:
    words = [w.rstrip("s") if len(w) > 3 else w for w in query.lower().split()]
    return tuple(p for p in CATALOG if all(w in _SEARCH_TEXT[p.pid] for w in words))


def money(cents: int) -> str:
    return f"${cents // 100}.{cents % 100:02d}"


def luhn_ok(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    if len(digits) != 16 or len(digits) != len(number.replace(" ", "")):
        return False
    total = sum(d if i % 2 == 0 else (d * 2 - 9 if d * 2 > 9 else d * 2)
                for i, d in enumerate(reversed(digits)))
    return total % 10 == 0


def render(task: Task, page: str, arg: str, cart: tuple, form: tuple, shipping: str,
           orders: tuple, message: str) -> str:
    """The page as HTML-like text; every page repeats the task and the navigation."""
    count = sum(q for _, q in cart)
    head = (f'<page name="{page}">\n<task>{task.text}</task>\n'
            f'<nav><a id="home">Home</a> <a id="cart">Cart ({count})</a> '
            f'<form id="search"><input name="query"/></form></nav>\n')
    if message:
        head += f"<message>{message}</message>\n"
    return head + _BODIES[page](arg, cart, form, shipping, orders) + "</page>"


def _home(arg, cart, form, shipping, orders) -> str:
    return "<h1>Welcome to Cobalt Mart</h1>\n<p>Search the catalog to find products.</p>\n"


def _results(arg, cart, form, shipping, orders) -> str:
    found = search(arg)
    rows = "".join(f'<li><a id="{p.pid}">{p.title}</a> color={p.color} '
                   f"price={money(p.price)} rating={p.rating}</li>\n" for p in found)
    return f'<h1>Results for "{arg}" ({len(found)})</h1>\n<ul>\n{rows}</ul>\n'


def _product(arg, cart, form, shipping, orders) -> str:
    p = BY_ID[arg.split(":")[0]]
    quantity = arg.split(":")[1]
    return (f"<h1>{p.title}</h1>\n<p>category={p.category} color={p.color} "
            f"price={money(p.price)} rating={p.rating}</p>\n"
            f'<select name="quantity" value="{quantity}">1 2 3 4 5</select>\n'
            '<button id="add-to-cart">Add to cart</button>\n')


def _cart(arg, cart, form, shipping, orders) -> str:
    rows = "".join(f'<li>{BY_ID[pid].title} x{q} = {money(BY_ID[pid].price * q)} '
                   f'<button id="remove-{pid}">Remove</button></li>\n' for pid, q in cart)
    total = sum(BY_ID[pid].price * q for pid, q in cart)
    return (f"<h1>Cart</h1>\n<ul>\n{rows}</ul>\n<p>subtotal={money(total)}</p>\n"
            '<button id="checkout">Checkout</button>\n')


def _address(arg, cart, form, shipping, orders) -> str:
    inputs = "".join(f'<input name="{f}" value="{v}"/>\n' for f, v in zip(FIELDS[:4], form[:4], strict=True))
    return f'<h1>Shipping address</h1>\n{inputs}<button id="continue">Continue</button>\n'


def _shipping(arg, cart, form, shipping, orders) -> str:
    options = " ".join(f"{k}={money(v)}" for k, v in SHIPPING.items())
    return (f'<h1>Shipping method</h1>\n<select name="shipping" value="{shipping}">{options}'
            '</select>\n<button id="continue">Continue</button>\n')


def _payment(arg, cart, form, shipping, orders) -> str:
    return (f'<h1>Payment</h1>\n<input name="card" value="{form[4]}"/>\n'
            '<button id="continue">Continue</button>\n')


def _review(arg, cart, form, shipping, orders) -> str:
    items = ", ".join(f"{BY_ID[pid].title} x{q}" for pid, q in cart)
    total = sum(BY_ID[pid].price * q for pid, q in cart) + SHIPPING[shipping]
    return (f"<h1>Review your order</h1>\n<p>items: {items}</p>\n<p>ship to: "
            f"{', '.join(form[:4])}</p>\n<p>shipping: {shipping}</p>\n<p>card: ****{form[4][-4:]}"
            f"</p>\n<p>total={money(total)}</p>\n<button id=\"place-order\">Place order</button>\n")


def _confirmation(arg, cart, form, shipping, orders) -> str:
    return f"<h1>Thank you!</h1>\n<p>Order {arg} is confirmed.</p>\n"


_BODIES = {"home": _home, "results": _results, "product": _product, "cart": _cart,
           "address": _address, "shipping": _shipping, "payment": _payment,
           "review": _review, "confirmation": _confirmation}
