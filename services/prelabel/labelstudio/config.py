"""A Label Studio project's labelling config, read for what Prelabel can pre-label: image classification.

Label Studio describes a project in XML: ``<Image name="image" value="$image"/>`` shows the task's
``image`` field and ``<Choices name="choice" toName="image">`` holds the classes. Predictions must name
both tags and may only use the project's own choice values.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from prelabel.errors import InvalidArgument

SUPPORTED = "image classification: one <Image> tag and a <Choices> tag (single choice) whose toName is that image"


@dataclass(frozen=True)
class ImageClassification:
    from_name: str  # the <Choices> tag's name
    to_name: str  # the <Image> tag's name
    data_key: str  # the task data field holding the image (value="$image" -> "image")
    choices: tuple[str, ...]

    def choice_for(self, label: str) -> str | None:
        """The project's choice for a model label: the same value, else the same ignoring case; None if absent."""
        if label in self.choices:
            return label
        folded = {c.casefold(): c for c in self.choices}
        return folded.get(label.strip().casefold())


def parse(xml: str) -> ImageClassification:
    """Read ``xml``; raises InvalidArgument naming what is supported when the project is something else."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise InvalidArgument(f"the labelling config is not valid XML ({exc}); Prelabel supports {SUPPORTED}") from None
    images = {tag.get("name", ""): tag.get("value", "") for tag in root.iter() if tag.tag == "Image"}
    choices = [tag for tag in root.iter() if tag.tag == "Choices" and tag.get("toName") in images]
    if not images or not choices:
        found = sorted({tag.tag for tag in root.iter() if tag.tag[:1].isupper() and tag.tag != "View"})
        raise InvalidArgument(
            f"this project's labelling config has {', '.join(found) or 'no tags'}; Prelabel supports {SUPPORTED}"
        )
    tag = choices[0]
    to_name = tag.get("toName", "")
    value = images[to_name]
    if not value.startswith("$") or len(value) < 2:
        raise InvalidArgument(f'<Image name="{to_name}"> needs value="$field" naming the task field with the image')
    if tag.get("choice", "single") != "single":
        raise InvalidArgument(f'<Choices name="{tag.get("name")}"> allows several choices; Prelabel supports '
                              f"{SUPPORTED}")  # fmt: skip
    values = tuple(c.get("value", "") for c in tag.iter("Choice") if c.get("value"))
    if len(values) < 2:
        raise InvalidArgument(f'<Choices name="{tag.get("name")}"> needs at least two <Choice value="..."/> tags')
    return ImageClassification(tag.get("name", ""), to_name, value[1:], values)
