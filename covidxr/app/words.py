"""The page's own words, styles and browser scripts: everything the page says that is not a
verdict (report.py) or a model's description (model_card.py)."""

from __future__ import annotations

TITLE = "covidxr: COVID-19 on chest X-rays"
HEADER = ("# covidxr\nCOVID-19, normal or other pneumonia on a frontal chest X-ray, "
          "with a heatmap of the regions that drove the decision.")
NOTICE = ("**Research and teaching tool, not a medical device.** Not validated for clinical use: "
          "do not use it to diagnose, treat or triage anyone.")
CARD_LINK = "[MODEL_CARD.md](#model-card-full)"
COMPARE_INTRO = ("**Every model on the same X-ray.** Each map shows where that model's evidence lies; lung focus "
                 "is the share of it on the lungs, against an even spread. A model can be right for the wrong "
                 "reason: compare where they look, then test it below. The model card "
                 f"({CARD_LINK}, at the foot of the page) has their measured numbers.")
MAP_TEST_INTRO = ("A heatmap shows where the evidence lies; blanking shows whether the model needs it there. "
                  "Fill the lungs (or everything but them) with flat gray and ask the model again. "
                  f"The model card ({CARD_LINK}, shortcut audit) has the same test over the whole test split.")
DELETION_INTRO = ("**Does the map point at what the model uses?** Remove the pixels the map marks hottest, a "
                  "growing share, and watch the probability fall; then remove as many at random. Removed pixels are "
                  "filled in from their neighbours (pytorch-grad-cam's ROAD), so the holes themselves say nothing.")
FILE_TEST_INTRO = ("**Does the answer survive the file?** The same X-ray compressed (JPEG quality 30), as a smaller "
                   "copy (256 px) and blurred: the lungs are the same in every copy, so a model reading the disease "
                   "gives the same label. One that changes its answer reads the file's quality. The model card "
                   f"({CARD_LINK}, quality audit) has the same test over the whole test split and two new hospitals.")
NO_EXAMPLES = "No example images here yet. Fetch them with `{command}`, then restart the app."
INPUT_CAPTION = "**Input**, as the model reads it"
OVERLAY_CAPTION = "**Heatmap** over the input"
SLOW_METHODS = {"scorecam"}  # the method menu says "(slow)" after these

# The result's images carry no label or toolbar over them (their captions sit above): the top
# strip of an X-ray is where text markers sit, and the page asks students to look there. The test
# buttons read as buttons (dark text, a border), not as disabled gray text. The method menu's
# text stops before its arrow on a phone.
CSS = """
.secondary { color: var(--body-text-color-subdued); font-size: var(--text-sm); }
#examples table { table-layout: fixed; width: 100%; }
#examples th:first-child, #examples td.image { width: 84px; }
#examples td, #examples th { white-space: normal; overflow-wrap: anywhere; }
.caption p { margin: 0; font-size: var(--text-sm); }
.test-button { color: var(--body-text-color) !important; border: 1px solid var(--border-color-accent) !important;
               font-size: var(--text-md) !important; font-weight: 600 !important; }
#method input { text-overflow: ellipsis; padding-right: 2.2em; }
.icon-button-wrapper.top-panel:not(:has(button)) { display: none; }
/* The file test's table: on a phone it scrolls sideways instead of breaking words letter by letter. */
#file-test-result table { display: block; overflow-x: auto; max-width: 100%; border: 0 !important; }
#file-test-result th, #file-test-result td { min-width: 7em; overflow-wrap: normal; word-break: normal; }
"""

# After an analysis started from the inputs, bring the result into view when it lies out of sight
# (on a phone the result sits below the upload and the examples). Runs in the browser only.
SHOW_RESULT_JS = """() => {
  const result = document.getElementById("result");
  const top = result ? result.getBoundingClientRect().top : 0;
  if (top < 0 || top > window.innerHeight * 0.6) result.scrollIntoView({behavior: "smooth", block: "start"});
}"""

# A link to the model card (CARD_LINK) opens its panel as well as scrolling to it: a closed panel
# at the foot of the page showed nothing of what the link promised.
OPEN_CARD_JS = """() => {
  document.addEventListener("click", (event) => {
    const link = event.target.closest && event.target.closest('a[href="#model-card-full"]');
    const panel = document.getElementById("model-card-full");
    if (!link || !panel) return;
    const toggle = panel.querySelector(".label-wrap");
    if (toggle && !toggle.classList.contains("open")) toggle.click();
    setTimeout(() => panel.scrollIntoView({behavior: "smooth", block: "start"}), 50);
  });
}"""
