"""Defect knowledge base: per defect family, how it looks, likely causes, effect on function, prevention.

Conversation synthesis draws its complex-reasoning answers (cause / effect / prevention) from here, so that
answers stay factual without a teacher LLM. Which family a defect name belongs to, and how two names compare,
is the taxonomy's business (`anomaly_assistant.scoring`: `defect_family`, `type_similarity`), shared with the
rewards and metrics; this module only holds the prose for each of its families.
"""

from __future__ import annotations

from dataclasses import dataclass

from anomaly_assistant.scoring import OTHER_FAMILY, defect_family


@dataclass(frozen=True)
class DefectFamily:
    """The prose about one family of `scoring.DEFECT_FAMILIES`."""

    name: str
    looks: tuple[str, ...]  # how it appears in the image
    causes: tuple[str, ...]
    effects: tuple[str, ...]
    prevention: tuple[str, ...]


FAMILIES: tuple[DefectFamily, ...] = (
    DefectFamily(
        "scratch",
        (
            "a thin line that catches the light differently from the surrounding surface",
            "a narrow linear mark cutting across the otherwise regular surface texture",
        ),
        (
            "contact with a sharp tool or fixture during handling",
            "parts sliding against each other in transport",
            "abrasive particles trapped under a conveyor or gripper",
        ),
        (
            "it spoils the appearance and can be a starting point for corrosion",
            "a deep scratch can weaken a coating and let moisture reach the base material",
        ),
        (
            "add protective separators and soft grippers",
            "keep conveyors and fixtures clean of burrs and grit",
            "inspect tooling edges regularly",
        ),
    ),
    DefectFamily(
        "crack",
        (
            "a dark, jagged line that branches irregularly",
            "a narrow irregular fracture line through the material",
        ),
        (
            "mechanical stress or impact",
            "thermal shock during cooling or firing",
            "material fatigue or internal flaws",
        ),
        ("it weakens the part and can grow until the part fails", "it can leak or break under load"),
        (
            "control cooling rates and thermal gradients",
            "reduce impact and clamping forces",
            "screen raw material for internal flaws",
        ),
    ),
    DefectFamily(
        "missing",
        (
            "a region where material that should be there is absent",
            "an edge whose outline is interrupted by a gap",
        ),
        (
            "impact during handling or transport",
            "incomplete forming, moulding or assembly",
            "brittle material chipping under stress",
        ),
        (
            "the part may not fit, seal or carry load as designed",
            "missing material can break the part's function",
        ),
        (
            "cushion parts during handling",
            "monitor forming and assembly steps for incomplete fills",
            "tune process parameters that cause brittleness",
        ),
    ),
    DefectFamily(
        "hole",
        (
            "a small dark spot with a sharp rim where the surface is perforated",
            "a round cavity in the surface",
        ),
        (
            "gas trapped during casting or sintering",
            "a sharp object piercing the material",
            "local etching or corrosion",
        ),
        (
            "it can let liquids or gas through and weakens the wall",
            "it lowers the part's strength and tightness",
        ),
        (
            "degas the material and control sintering or casting",
            "remove sharp objects from the handling path",
            "check process chemistry regularly",
        ),
    ),
    DefectFamily(
        "contamination",
        (
            "a blotch whose colour differs from the clean surface",
            "a soft-edged discoloured patch on the surface",
        ),
        (
            "oil, coolant or glue residue left from processing",
            "dirty gloves, tools or packaging",
            "splashes from a nearby process step",
        ),
        ("it can hinder coating, bonding or electrical contact", "it is a cosmetic defect customers reject"),
        ("clean parts and tools after processing", "shield the line from splashes", "enforce clean handling"),
    ),
    DefectFamily(
        "foreign_object",
        (
            "an object lying on the surface that does not belong to the part",
            "a small extra item with a colour unlike the part",
        ),
        (
            "debris from the environment or packaging",
            "fibres from cloths or clothing",
            "chips or swarf from machining",
        ),
        (
            "it can be carried into an assembly and cause malfunction",
            "on electronics it can bridge conductors",
        ),
        (
            "keep the production area clean and covered",
            "use air knives or filtered enclosures",
            "inspect before packaging",
        ),
    ),
    DefectFamily(
        "deformation",
        (
            "a region whose shape or outline departs from the regular form",
            "a distorted area where the geometry is not as designed",
        ),
        ("excessive force during pressing or clamping", "heat distortion", "mis-set forming tools"),
        ("the part may not fit or assemble properly", "it changes how the part carries load or seals"),
        (
            "calibrate presses and fixtures",
            "control temperature during forming",
            "use gauges to catch drift early",
        ),
    ),
    DefectFamily(
        "misplacement",
        (
            "a region that looks copied from elsewhere or placed in the wrong position or orientation",
            "a piece whose position or orientation breaks the regular arrangement",
        ),
        (
            "an assembly or placement error",
            "a feeder or robot picking the wrong item",
            "machine misalignment",
        ),
        ("the product may not work or may not assemble", "it breaks the product's specified layout"),
        (
            "poka-yoke fixtures that only accept the right orientation",
            "vision checks after placement",
            "regular calibration of placement machines",
        ),
    ),
    DefectFamily(
        "discolouration",
        (
            "an area whose colour or texture differs from the rest of the surface",
            "a blotchy region where the surface texture is disturbed",
        ),
        ("uneven heat treatment or coating", "oxidation or corrosion", "pigment or material variation"),
        ("it can signal material degradation", "it is rejected as a cosmetic defect"),
        ("control coating thickness and curing", "store parts dry", "monitor raw material batches"),
    ),
    DefectFamily(
        "cut",
        ("a sharp-edged opening or slit in the material", "a clean narrow cut through the surface"),
        ("blades or sharp edges in the handling path", "cutting tools mis-set during trimming"),
        ("it exposes inner layers and weakens the part", "it can make the part unsafe to use"),
        ("guard sharp edges", "check trimming tool settings"),
    ),
)
_BY_NAME = {f.name: f for f in FAMILIES}
GENERIC = DefectFamily(
    OTHER_FAMILY,
    ("a region that differs from what a defect-free part looks like",),
    ("a process deviation upstream", "handling damage"),
    ("it may affect how the part looks or works",),
    ("trace the deviation to its process step and monitor that step",),
)

# what a category looks like, for "what does the image show" answers
CATEGORY_TEXT = {
    "woven": "a woven fabric with a regular over-under thread pattern",
    "brushed_metal": "a brushed metal surface with fine parallel grain",
    "wood": "a wooden surface with growth rings and fibres",
    "grid": "a metal wire grid",
    "nut": "a hexagonal metal nut seen from above",
    "pill": "a pill on a plain background",
    "bottle": "a bottle seen from above, looking into its opening",
    "screw": "a metal screw lying on a plain background",
    "pcb": "a printed circuit board with copper traces and pads",
    "magnetic_tile": "the surface of a magnetic tile",
    "magnetic": "the surface of a magnetic tile",
}


def family_of(defect_type: str | None) -> DefectFamily:
    """The prose for the family a defect name belongs to (`GENERIC` for names no family claims)."""
    return _BY_NAME.get(defect_family(defect_type), GENERIC)


def describe_category(category: str) -> str:
    """What a category's images show, for "what does the image show" answers (a generic phrase if unknown)."""
    key = (category or "").lower()
    if key in CATEGORY_TEXT:
        return CATEGORY_TEXT[key]
    for k, text in CATEGORY_TEXT.items():
        if k in key:
            return text
    return f"a {key.replace('_', ' ')}" if key else "an industrial part"
