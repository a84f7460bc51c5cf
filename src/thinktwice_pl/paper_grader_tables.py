"""The reference grader's word and macro tables (`thinktwice_pl.paper_grader`), as data: unit words in the order the
reference lists them, and the LaTeX macros of its second normalisation."""

# Tables laid out by hand, several entries per line: the formatter would put each of several hundred on its own line.
# fmt: off

# Unit and filler words (MathQA's, as the reference lists them) deleted where they stand alone (between non-word
# characters): the words, then their plurals, in this order, the whole list twice. They are regular expressions as
# written ("q ." matches "q", a space and any character), as in the reference; the single letters make "a+b" and
# "c+b" equal for both, a rare false positive kept so that scores stay comparable with the paper's.
UNIT_WORDS = (
    "east", "degree", "mph", "kmph", "ft", "m sqaure", " m east", "sq m", "deg", "mile", "q .", "monkey", "prime",
    "ratio", "profit of rs", "rd", "o", "gm", "p . m", "lb", "tile", "per", "dm", "lt", "gain", "ab", "way", "west",
    "a .", "b .", "c .", "d .", "e .", "f .", "g .", "h .", "t", "a", "h", "no change", "men", "soldier", "pie", "bc",
    "excess", "st", "inches", "noon", "percent", "by", "gal", "kmh", "c", "acre", "rise", "a . m", "th", "π r 2",
    "sq", "mark", "l", "toy", "coin", "sq . m", "gallon", "° f", "profit", "minw", "yr", "women", "feet", "am", "pm",
    "hr", "cu cm", "square", "v â € ™", "are", "rupee", "rounds", "cubic", "cc", "mtr", "s", "ohm", "number", "day",
    "hour", "minute", "min", "second", "man", "woman", "sec", "cube", "mt", "sq inch", "mp", "∏ cm ³", "hectare",
    "more", "unit", "cu . m", "cm 2", "rs .", "rs", "kg", "g", "month", "km", "m", "cm", "mm", "apple", "liter",
    "loss", "yard", "pure", "year", "increase", "decrease", "d", "less", "Surface", "litre", "pi sq m", "s .",
    "metre", "meter", "inch",
)
# Units deleted by the second normalisation, with an optional plural and power: "cm^2", "inches", "days".
SECOND_PASS_UNITS = (
    "degree", "cm", "centimeter", "meter", "mile", "second", "minute", "hour", "day", "week", "month", "year",
    "foot", "feet", "inch", "yard",
)



# LaTeX to plain text for the second normalisation (what pylatexenc does for the reference, on the macros that
# occur in answers): macros that only style or size their argument vanish, symbols become text, others stay.
STYLE_MACROS = {
    "text", "textbf", "textit", "textrm", "textsf", "texttt", "textsc", "textsl", "textup", "textnormal", "emph",
    "mbox", "mathrm", "mathbf", "mathit", "mathsf", "mathtt", "mathbb", "mathcal", "mathscr", "mathfrak",
    "mathnormal", "boldsymbol", "operatorname", "overline", "underline", "widehat", "widetilde", "hat", "bar", "vec",
    "tilde", "dot", "ddot", "overrightarrow", "overleftarrow", "left", "right", "big", "Big", "bigg", "Bigg", "bigl",
    "bigr", "Bigl", "Bigr", "biggl", "biggr", "displaystyle", "textstyle", "scriptstyle", "limits", "nolimits", "!",
    "hspace",
}
TEXT_MACROS = {
    "pi": "pi", "infty": "inf", "cup": "U", "cdot": "*", "times": "*", "cap": "∩", "setminus": "∖", "in": "∈",
    "notin": "∉", "subset": "⊂", "subseteq": "⊆", "emptyset": "∅", "varnothing": "∅", "le": "≤", "leq": "≤",
    "ge": "≥", "geq": "≥", "ne": "≠", "neq": "≠", "approx": "≈", "equiv": "≡", "sim": "∼", "pm": "±", "mp": "∓",
    "circ": "∘", "ldots": "…", "dots": "…", "dotsc": "…", "dotsb": "…", "cdots": "⋯", "to": "→", "rightarrow": "→",
    "Rightarrow": "⇒", "leftarrow": "←", "angle": "∠", "triangle": "△", "perp": "⊥", "parallel": "∥", "mid": "|",
    "vert": "|", "lvert": "|", "rvert": "|", "lfloor": "⌊", "rfloor": "⌋", "lceil": "⌈", "rceil": "⌉", "langle": "⟨",
    "rangle": "⟩", "prime": "'", ",": " ", ";": " ", ":": " ", " ": " ", "quad": "  ", "qquad": "    ", "{": "{",
    "}": "}", "%": "%", "$": "$", "_": "_", "&": "&", "#": "#", "\\": "\n",
}
FUNCTION_NAMES = {
    "sin", "cos", "tan", "sec", "csc", "cot", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "ln", "log", "exp",
    "max", "min", "deg", "det", "gcd", "lim", "sup", "inf",
}
