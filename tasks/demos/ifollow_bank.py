"""The question bank of the instruction-following demo (tasks/demos/ifollow.py): about 500 hand-written
facts and the generated ones, built deterministically at import, and the number words both modules use.
A module of its own because it is mostly data: the fact tables."""
from __future__ import annotations

import functools
import re
import unicodedata
from typing import NamedTuple

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int, use_and: bool = False) -> str:
    """English words of 0 <= n < 1,000,000 ("forty-two", "one hundred [and] five")."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    big, unit = (100, "hundred") if n < 1000 else (1000, "thousand")
    head, rest = divmod(n, big)
    tail = "" if rest == 0 else (" and " if use_and and rest < 100 else " ") + number_words(rest, use_and)
    return f"{number_words(head)} {unit}{tail}"


# -------------------------------------------------------------------------------------- question bank
class Fact(NamedTuple):
    key: str                   # facts sharing a key go to the same split
    category: str
    qtype: str                 # "word" | "number" | "yesno"
    questions: tuple[str, ...]
    answer: str                # display form: "Paris", "42", "Yes"
    accepted: tuple[str, ...]  # normalised accepted answers
    sentence: str              # a full comma-free sentence that states the answer


def normalise(s: str) -> str:
    s = "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c)).lower()
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # "1,000" -> "1000"
    s = re.sub(r"[-‐‑–—_]", " ", s)  # "forty-two" -> "forty two"
    return " ".join(s.split())


BANK: list[Fact] = []
_BY_QUESTION: dict[str, Fact] = {}


def _add(key: str, category: str, questions, answers, sentence: str, qtype: str = "word") -> None:
    if isinstance(answers, int):  # digits and words, already in normal form (ASCII, no hyphen)
        words = [number_words(answers, a).replace("-", " ") for a in (False, True)]
        qtype, answers, accepted = "number", (str(answers),), (str(answers), *dict.fromkeys(words))
    else:
        accepted = tuple(dict.fromkeys(map(normalise, answers)))
    fact = Fact(key, category, qtype, tuple(questions), answers[0], accepted, sentence)
    for q in fact.questions:
        if q in _BY_QUESTION:  # a question with two facts would make is_correct ambiguous
            raise ValueError(f"duplicate question {q!r}")
        _BY_QUESTION[q] = fact
    BANK.append(fact)


def _yesno(key: str, category: str, question: str, yes: bool, body: str) -> None:
    _add(key, category, (question,), ("Yes",) if yes else ("No",), f"{'Yes' if yes else 'No'}. {body}", "yesno")


def _rows(table: str) -> list[list[str]]:
    return [[f.strip() for f in row.split("=")] for row in table.split(";") if row.strip()]


def _an(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


CAPITALS = _rows("""France=Paris; Spain=Madrid; Italy=Rome; Germany=Berlin; Japan=Tokyo; China=Beijing; Russia=Moscow;
Egypt=Cairo; Greece=Athens; Portugal=Lisbon; Ireland=Dublin; Norway=Oslo; Sweden=Stockholm; Finland=Helsinki;
Denmark=Copenhagen; Poland=Warsaw; Austria=Vienna; Hungary=Budapest; the Czech Republic=Prague; Belgium=Brussels;
the Netherlands=Amsterdam; Switzerland=Bern; Canada=Ottawa; Peru=Lima; Chile=Santiago; Colombia=Bogota;
Venezuela=Caracas; Cuba=Havana; Kenya=Nairobi; Nigeria=Abuja; Morocco=Rabat; Ghana=Accra; Thailand=Bangkok;
Vietnam=Hanoi; Indonesia=Jakarta; the Philippines=Manila; South Korea=Seoul; Pakistan=Islamabad; Iran=Tehran;
Iraq=Baghdad; Turkey=Ankara; Saudi Arabia=Riyadh; Australia=Canberra; New Zealand=Wellington;
the United Kingdom=London; Scotland=Edinburgh; Wales=Cardiff; Iceland=Reykjavik; Ukraine=Kyiv|Kiev; Romania=Bucharest;
Bulgaria=Sofia; Serbia=Belgrade; Croatia=Zagreb; Lebanon=Beirut; Syria=Damascus; Jordan=Amman; Afghanistan=Kabul;
Nepal=Kathmandu; Bangladesh=Dhaka; Qatar=Doha; Uganda=Kampala; Senegal=Dakar; Zimbabwe=Harare; Zambia=Lusaka;
Angola=Luanda; Libya=Tripoli; Tunisia=Tunis; Algeria=Algiers; Sudan=Khartoum; Ecuador=Quito; Uruguay=Montevideo;
Paraguay=Asuncion; Jamaica=Kingston; Latvia=Riga; Lithuania=Vilnius; Estonia=Tallinn; Slovakia=Bratislava;
Slovenia=Ljubljana; Albania=Tirana; Belarus=Minsk; Armenia=Yerevan; Mongolia=Ulaanbaatar; Laos=Vientiane;
Brazil=Brasilia; the United States=Washington; Cyprus=Nicosia; Malta=Valletta; Mali=Bamako; Rwanda=Kigali;
Somalia=Mogadishu; Oman=Muscat; Bhutan=Thimphu; Nicaragua=Managua""")
for _i, (_c, _a) in enumerate(CAPITALS):
    _cap_a = _a.split("|")[0]
    _add(f"cap:{_c}", "capital", (f"What is the capital of {_c}?", f"Which city is the capital of {_c}?"),
         _a.split("|"), f"The capital of {_c} is {_cap_a}.")
    _yesno(f"cap:{_c}", "capital_yn", f"Is {_cap_a} the capital of {_c}?", True, f"{_cap_a} is the capital of {_c}.")
    _wrong = CAPITALS[(_i + 5) % len(CAPITALS)][1].split("|")[0]
    _yesno(f"cap:{_c}", "capital_yn", f"Is {_wrong} the capital of {_c}?", False, f"The capital of {_c} is {_cap_a}.")

for _c, _a in _rows("""France=French; Spain=Spanish; Germany=German; Italy=Italian; Japan=Japanese; Russia=Russian;
Portugal=Portuguese; Brazil=Portuguese; Greece=Greek; Mexico=Spanish; the Netherlands=Dutch; Sweden=Swedish;
Poland=Polish; Turkey=Turkish; Egypt=Arabic; South Korea=Korean; Vietnam=Vietnamese; Thailand=Thai; Finland=Finnish;
Norway=Norwegian; Denmark=Danish; Hungary=Hungarian; Argentina=Spanish; Austria=German; China=Chinese|Mandarin;
Iran=Persian|Farsi; Israel=Hebrew; Ukraine=Ukrainian; Indonesia=Indonesian"""):
    _add(f"lang:{_c}", "language", (f"What language is mainly spoken in {_c}?", f"What is the main language of {_c}?"),
         _a.split("|"), f"People in {_c} mainly speak {_a.split('|')[0]}.")

for _c, _a in _rows("""Japan=yen; the United Kingdom=pound|pounds|sterling; the United States=dollar|dollars;
India=rupee|rupees; Mexico=peso|pesos; Russia=ruble|rubles|rouble; China=yuan|renminbi; Switzerland=franc|francs;
South Korea=won; Germany=euro|euros; Brazil=real|reais; Thailand=baht; Poland=zloty; Turkey=lira;
Sweden=krona|kronor"""):
    _add(f"cur:{_c}", "currency", (f"What is the currency of {_c}?", f"What money is used in {_c}?"),
         _a.split("|"), f"The currency of {_c} is the {_a.split('|')[0]}.")

for _s, _a in _rows("""moo=cow; woof=dog; meow=cat; oink=pig; baa=sheep; neigh=horse; quack=duck; hiss=snake;
roar=lion; cluck=hen|chicken; hoot=owl; buzz=bee; ribbit=frog; coo=dove|pigeon; bray=donkey; howl=wolf"""):
    _al = _a.split("|")
    _add(f"sound:{_s}", "animal_sound", (f"Which animal says {_s}?", f"What animal goes {_s}?"),
         _al + [x + "s" for x in _al], f"{_cap(_an(_al[0]))} says {_s}.")

for _x, _a in _rows("""dog=puppy; cat=kitten; cow=calf; sheep=lamb; horse=foal; goat=kid; duck=duckling; frog=tadpole;
kangaroo=joey; bear=cub; goose=gosling; swan=cygnet; deer=fawn; pig=piglet; owl=owlet; hen=chick; eagle=eaglet;
seal=pup"""):
    _add(f"baby:{_x}", "baby_animal", (f"What is a baby {_x} called?", f"What do you call a young {_x}?"),
         (_a, _a + "s"), f"A baby {_x} is called {_an(_a)}.")

_CLASSES = _rows("""whale=mammal; dolphin=mammal; shark=fish; eagle=bird; snake=reptile; frog=amphibian; bat=mammal;
penguin=bird; crocodile=reptile; salmon=fish; lizard=reptile; owl=bird; toad=amphibian; turtle=reptile; horse=mammal;
ostrich=bird; tuna=fish; newt=amphibian; lion=mammal; parrot=bird""")
_KINDS_OF_ANIMAL = ("mammal", "bird", "fish", "reptile", "amphibian")
for _x, _a in _CLASSES:
    _add(f"class:{_x}", "animal_class", (f"What type of animal is {_an(_x)}?",
                                         f"What class of animals does the {_x} belong to?"),
         (_a, _a + "s", _a + "es"), f"{_cap(_an(_x))} is {_an(_a)}.")
    _yesno(f"class:{_x}", "animal_class_yn", f"Is {_an(_x)} {_an(_a)}?", True, f"{_cap(_an(_x))} is {_an(_a)}.")
    _w = _KINDS_OF_ANIMAL[(_KINDS_OF_ANIMAL.index(_a) + 1 + len(_x) % 4) % 5]
    _yesno(f"class:{_x}", "animal_class_yn", f"Is {_an(_x)} {_an(_w)}?", False, f"{_cap(_an(_x))} is {_an(_a)}.")

for _x, _a in _rows("""a ripe banana=yellow; fresh snow=white; grass=green; the sky on a clear day=blue; coal=black;
a ripe tomato=red; a carrot=orange; a lemon=yellow; milk=white; a crow=black; a flamingo=pink; an emerald=green;
a ruby=red; a sapphire=blue; chocolate=brown; a pumpkin=orange; a lime=green; a strawberry=red; a polar bear=white;
a raven=black; a cucumber=green; a fire truck=red; an eggplant=purple; a ripe cherry=red; cotton=white;
an orange=orange; the trunk of a tree=brown; blood=red; a tangerine=orange; a lettuce leaf=green; a sunflower=yellow;
charcoal=black; a canary=yellow; salt=white; a cooked lobster=red; an elephant=gray|grey"""):
    _add(f"colour:{_x}", "colour", (f"What color is {_x}?", f"What is the color of {_x}?"), _a.split("|"),
         f"{_cap(_x)} is {_a.split('|')[0]}.")
for _x, _a in _rows("""blue and yellow=green; red and white=pink; red and yellow=orange; blue and red=purple|violet;
black and white=gray|grey"""):
    _add(f"mix:{_x}", "colour_mix", (f"What color do you get by mixing {_x}?", f"Which color comes from mixing {_x}?"),
         _a.split("|"), f"Mixing {_x} makes {_a.split('|')[0]}.")

for _x, _a in _rows("""hot=cold; cold=hot; big=small|little; small=big|large; up=down; down=up; day=night; night=day;
fast=slow; slow=fast|quick; happy=sad|unhappy; sad=happy; open=closed|shut; closed=open; wet=dry; dry=wet; full=empty;
empty=full; early=late; late=early; left=right; in=out; out=in; first=last; last=first; love=hate; hate=love; win=lose;
lose=win|find; push=pull; pull=push; black=white; white=black; north=south; south=north; east=west; west=east;
rich=poor; poor=rich; strong=weak; weak=strong; clean=dirty; dirty=clean; thick=thin; thin=thick|fat; top=bottom;
bottom=top; above=below|under; below=above; true=false; false=true; awake=asleep; asleep=awake; alive=dead; dead=alive;
inside=outside; outside=inside; front=back|rear; high=low; low=high; buy=sell; sell=buy; give=take|receive;
entrance=exit; exit=entrance; before=after; after=before; tall=short; long=short; light=dark|heavy; dark=light|bright;
heavy=light; smooth=rough; old=young|new; young=old; new=old; friend=enemy|foe; enemy=friend|ally; cheap=expensive;
expensive=cheap; remember=forget; forget=remember; summer=winter; winter=summer; boy=girl; girl=boy; king=queen;
queen=king; always=never; never=always"""):
    _al = _a.split("|")
    _add("opp:" + "-".join(sorted((_x, _al[0]))), "opposite",
         (f"What is the opposite of {_x}?", f"What word means the opposite of {_x}?"), _al,
         f"The opposite of {_x} is {_al[0]}.")

for _x, _a in _rows("""Egypt=Africa; Kenya=Africa; Nigeria=Africa; Ghana=Africa; Morocco=Africa; Ethiopia=Africa;
Senegal=Africa; Japan=Asia; China=Asia; India=Asia; Thailand=Asia; Vietnam=Asia; Nepal=Asia; Mongolia=Asia;
France=Europe; Germany=Europe; Italy=Europe; Poland=Europe; Norway=Europe; Spain=Europe; Greece=Europe;
Ireland=Europe"""):
    _add(f"cont:{_x}", "continent", (f"On which continent is {_x}?", f"Which continent is {_x} in?"), (_a,),
         f"{_x} is in {_a}.")

for _x, _a in _rows("""gold=Au; silver=Ag; iron=Fe; sodium=Na; helium=He; copper=Cu; lead=Pb; zinc=Zn; calcium=Ca;
tin=Sn; neon=Ne; chlorine=Cl; magnesium=Mg"""):
    _add(f"sym:{_x}", "chem_symbol", (f"What is the chemical symbol for {_x}?",), (_a,),
         f"The chemical symbol for {_x} is {_a}.")

for _name, _seq in (("day", "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()),
                    ("month", ("January February March April May June July August September October November "
                               "December").split())):
    for _i, _x in enumerate(_seq):
        _n = _seq[(_i + 1) % len(_seq)]
        _add(f"seq:{_x}", "sequence", (f"What {_name} comes after {_x}?",), (_n,), f"{_n} comes after {_x}.")
        _add(f"seq:{_x}", "sequence", (f"What {_name} comes before {_n}?",), (_x,), f"{_x} comes before {_n}.")

# question = accepted answers (first: display) = sentence
for _q, _a, _s in _rows("""Which planet is closest to the Sun?=Mercury=Mercury is closest to the Sun;
What is the largest planet?=Jupiter=Jupiter is the largest planet;
Which planet is called the Red Planet?=Mars=It is Mars; Which planet has famous rings?=Saturn=Saturn has famous rings;
Which planet do we live on?=Earth=We live on Earth; What is the hottest planet?=Venus=Venus is the hottest planet;
Which planet is farthest from the Sun?=Neptune=It is Neptune;
What natural satellite orbits the Earth?=Moon=The Moon orbits the Earth;
What gas do people need to breathe?=oxygen=People need oxygen; What is the main gas in air?=nitrogen=It is nitrogen;
What force pulls objects toward the ground?=gravity=Gravity pulls objects down;
What is the center of an atom called?=nucleus=It is called the nucleus; What is frozen water called?=ice=It is ice;
What is the hardest natural substance?=diamond|diamonds=Diamond is the hardest;
What is the largest organ of the body?=skin=The skin is the largest organ;
Which organ pumps blood?=heart=The heart pumps blood;
Which organ do people think with?=brain=People think with their brain; What do bees make?=honey=Bees make honey;
Which organs do we breathe with?=lungs|lung=We breathe with our lungs;
What do caterpillars turn into?=butterflies|butterfly|moths|moth=They turn into butterflies;
What are animals that eat only plants called?=herbivores|herbivore=They are herbivores;
What are animals that eat only meat called?=carnivores|carnivore=They are carnivores;
Which metal is liquid at room temperature?=mercury=Mercury is liquid;
What is the largest ocean?=Pacific=It is the Pacific; What is the longest river in Africa?=Nile=It is the Nile;
What is the tallest mountain?=Everest=It is Mount Everest; What is the largest hot desert?=Sahara=It is the Sahara;
What is the largest continent?=Asia=Asia is the largest;
What is the smallest continent?=Australia|Oceania=It is Australia;
What is the coldest continent?=Antarctica=It is Antarctica; What state of matter is ice?=solid=Ice is a solid;
What state of matter is steam?=gas=Steam is a gas;
What is the largest animal?=whale|whales=The blue whale is the largest animal;
What is the fastest land animal?=cheetah|cheetahs=The cheetah is the fastest;
What is the tallest animal?=giraffe|giraffes=The giraffe is the tallest;
Which animal is the king of the jungle?=lion|lions=The lion is the king of the jungle;
Which animal has a trunk?=elephant|elephants=The elephant has a trunk;
Which animal spins a web?=spider|spiders=A spider spins a web;
Which bird is a symbol of peace?=dove|doves=The dove is a symbol of peace; What do hens lay?=eggs|egg=Hens lay eggs;
What do cows give us to drink?=milk=Cows give us milk; Who flies a plane?=pilot|pilots=A pilot flies a plane;
What tool cuts paper?=scissors=Scissors cut paper;
What instrument has black and white keys?=piano=The piano has black and white keys;
What season comes after winter?=spring=Spring comes after winter;
What season comes after summer?=autumn|fall=Autumn comes after summer;
What is the first month of the year?=January=It is January;
What is the last month of the year?=December=It is December;
Which country has the pyramids of Giza?=Egypt=They are in Egypt;
Which country has the Eiffel Tower?=France=It is in France; Which country has the Great Wall?=China=It is in China;
Which country has the Taj Mahal?=India=It is in India; What is the largest country by area?=Russia=It is Russia;
Who wrote Romeo and Juliet?=Shakespeare=Shakespeare wrote it;
Who painted the Mona Lisa?=Leonardo|da Vinci|davinci=Leonardo da Vinci painted it;
What is water's formula?=H2O=It is H2O"""):
    _add(f"misc:{_q}", "misc", (_q,), _a.split("|"), _s + ".")

for _x, _c, _n in _rows("""legs=a spider=8; legs=an insect=6; legs=a dog=4; legs=a bird=2; legs=an ant=6;
legs=a horse=4; arms=an octopus=8; legs=a chicken=2; wheels=a bicycle=2; wheels=a tricycle=3; wheels=a car=4;
sides=a triangle=3; sides=a square=4; sides=a pentagon=5; sides=a hexagon=6; sides=an octagon=8; faces=a cube=6;
strings=a violin=4; strings=a standard guitar=6; players=a soccer team=11; fingers=one hand=5;
letters=the English alphabet=26; keys=a standard piano=88; sides=a rectangle=4; legs=a tripod=3; hearts=an octopus=3;
bones=the adult human body=206; planets=our solar system=8; continents=the world=7; moons=the Earth=1"""):
    _add(f"have:{_x}:{_c}", "count", (f"How many {_x} does {_c} have?",), int(_n), f"{_cap(_c)} has {_n} {_x}.")
for _x, _c, _n in _rows("""days=a week=7; months=a year=12; hours=a day=24; minutes=an hour=60; seconds=a minute=60;
days=a year=365; days=a leap year=366; weeks=a year=52; centimeters=a meter=100; meters=a kilometer=1000;
grams=a kilogram=1000; millimeters=a centimeter=10; years=a century=100; years=a decade=10; years=a millennium=1000;
eggs=a dozen=12; cents=a dollar=100; days=April=30; days=January=31; minutes=half an hour=30;
minutes=a quarter of an hour=15; seconds=an hour=3600; hours=two days=48; days=two weeks=14; colors=a rainbow=7;
inches=a foot=12; feet=a yard=3; ounces=a pound=16; quarts=a gallon=4; hours=a week=168; months=half a year=6"""):
    _add(f"in:{_x}:{_c}", "count", (f"How many {_x} are in {_c}?",), int(_n), f"There are {_n} {_x} in {_c}.")
for _q, _n, _s in _rows("""
At what temperature in Celsius does water boil at sea level?=100=Water boils at 100 degrees Celsius;
At what temperature in Celsius does water freeze?=0=Water freezes at 0 degrees Celsius;
At what temperature in Fahrenheit does water freeze?=32=Water freezes at 32 degrees Fahrenheit"""):
    _add(f"misc:{_q}", "count", (_q,), int(_n), _s + ".")

for _q, _a, _b in _rows("""Is the Sun a star?=yes=The Sun is a star; Can penguins fly?=no=Penguins cannot fly;
Do fish live in water?=yes=Fish live in water; Is the Earth flat?=no=The Earth is round; Is ice cold?=yes=Ice is cold;
Is fire cold?=no=Fire is hot; Do spiders have six legs?=no=Spiders have eight legs;
Is a tomato a fruit?=yes=A tomato is a fruit; Is the Moon a planet?=no=The Moon is not a planet;
Does the Sun rise in the east?=yes=The Sun rises in the east;
Does the Sun set in the east?=no=The Sun sets in the west;
Is water made of hydrogen and oxygen?=yes=Water is made of hydrogen and oxygen;
Can people breathe underwater without help?=no=People need air to breathe;
Do birds have feathers?=yes=Birds have feathers; Do snakes have legs?=no=Snakes have no legs;
Is the Pacific the largest ocean?=yes=The Pacific is the largest ocean;
Is the Sahara a desert?=yes=The Sahara is a desert; Is Mount Everest in Africa?=no=Mount Everest is in Asia;
Is gold a metal?=yes=Gold is a metal; Is glass a metal?=no=Glass is not a metal;
Do plants need water to grow?=yes=Plants need water to grow; Can cats fly?=no=Cats cannot fly;
Is a spider an insect?=no=A spider is not an insect; Is a bee an insect?=yes=A bee is an insect;
Is winter colder than summer?=yes=Winter is colder than summer;
Is a week longer than a month?=no=A month is longer than a week; Is a year longer than a month?=yes=A year is longer;
Does a triangle have three sides?=yes=A triangle has three sides;
Does a square have five sides?=no=A square has four sides;
Is the sky green on a clear day?=no=The sky is blue on a clear day; Is snow white?=yes=Snow is white;
Are bananas blue?=no=Bananas are yellow; Do cows eat grass?=yes=Cows eat grass; Can dogs bark?=yes=Dogs can bark;
Is Jupiter bigger than the Earth?=yes=Jupiter is bigger than the Earth;
Is the Sun bigger than the Earth?=yes=The Sun is much bigger;
Is the Moon bigger than the Earth?=no=The Moon is smaller than the Earth;
Do people have two hearts?=no=People have one heart; Is the heart an organ?=yes=The heart is an organ;
Is Antarctica cold?=yes=Antarctica is very cold; Is Antarctica a hot place?=no=Antarctica is very cold;
Does water freeze at 50 degrees Celsius?=no=Water freezes at 0 degrees Celsius;
Are there seven days in a week?=yes=A week has seven days; Are there ten months in a year?=no=A year has twelve months;
Is English written from left to right?=yes=English is written from left to right;
Do fish have gills?=yes=Fish have gills; Is a carrot a vegetable?=yes=A carrot is a vegetable;
Is the ocean water salty?=yes=Ocean water is salty; Can a car fly?=no=A car cannot fly"""):
    _yesno(f"misc:{_q}", "misc_yn", _q, _a == "yes", _b + ".")

# Generated: parity and comparison yes/no, then arithmetic (a fact per operand pair; + and x keyed unordered).
for _n in range(2, 100):
    _even = "even" if _n % 2 == 0 else "odd"
    for _p in ("even", "odd"):
        _yesno(f"par:{_n}", "parity", f"Is {_n} an {_p} number?", _p == _even, f"{_n} is an {_even} number.")
for _i in range(60):
    _a, _b = 3 + (_i * 37) % 95, 3 + (_i * 53 + 11) % 95
    if _a != _b and f"Is {_a} greater than {_b}?" not in _BY_QUESTION:
        _rel = f"{_a} is {'greater' if _a > _b else 'less'} than {_b}."
        _yesno(f"cmp:{min(_a, _b)}:{max(_a, _b)}", "compare", f"Is {_a} greater than {_b}?", _a > _b, _rel)
        _yesno(f"cmp:{min(_a, _b)}:{max(_a, _b)}", "compare", f"Is {_a} less than {_b}?", _a < _b, _rel)
for _a in range(2, 51):
    for _b in range(2, 51):
        _add(f"add:{min(_a, _b)}:{max(_a, _b)}", "add", (f"What is {_a} plus {_b}?", f"What is {_a} + {_b}?",
             f"What is the sum of {_a} and {_b}?"), _a + _b, f"{_a} plus {_b} equals {_a + _b}.")
for _a in range(10, 61):
    for _b in range(2, _a):
        _add(f"sub:{_a}:{_b}", "sub", (f"What is {_a} minus {_b}?", f"What is {_a} - {_b}?",
             f"What is {_b} subtracted from {_a}?"), _a - _b, f"{_a} minus {_b} equals {_a - _b}.")
for _a in range(2, 13):
    for _b in range(2, 13):
        _add(f"mul:{min(_a, _b)}:{max(_a, _b)}", "mul", (f"What is {_a} times {_b}?",
             f"What is {_a} multiplied by {_b}?", f"What is {_a} x {_b}?"), _a * _b,
             f"{_a} times {_b} equals {_a * _b}.")


def fact_of(question: str) -> Fact | None:
    return _BY_QUESTION.get(" ".join(question.split())) if isinstance(question, str) else None


@functools.lru_cache(maxsize=None)  # one pattern per fact: re's own cache (512) thrashes over the bank
def answer_pattern(accepted: tuple[str, ...]) -> re.Pattern:
    return re.compile(r"(?<![a-z0-9])(?:" + "|".join(map(re.escape, accepted)) + r")(?![a-z0-9])")
