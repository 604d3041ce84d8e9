"""A user's click-through of the HeadCTMoLRE panel, with HeadCTMoLRE/HeadCTMoLRE.py loaded as Slicer loads it.

Run in its own process (Testing/test_module_gui.py does), because it installs the Qt stand-ins of
Testing/slicer_gui_standins.py into ``sys.modules``:

    HEADCT_MOLRE_MODELS=MODELS python Testing/module_gui_walk.py fresh --work DIR [--slicer-python <Slicer>/Base/Python]
    HEADCT_MOLRE_MODELS=MODELS python Testing/module_gui_walk.py full --work DIR --trained MODELS/TRAINED \
        --dicom SERIES --cases CSV

MODELS holds the tiny bundle ``tiny-random`` (and the trained one for ``full``).

``fresh``: a fresh install. torch cannot be imported in this process (``sys.modules['torch'] = None``) and is
reported as not installed: the panel is set up, the models are listed, Run is enabled, and Run asks the
PyTorch extension to install torch (first declined, then accepted: the analysis starts in a real worker
process, and Cancel ends it). ``full``: torch is importable but must never be imported here: Run on a CT
loaded from a DICOM series with a real worker, the result shown, a finding selected (the slice views jump to
its top slice), DICOM export into a chosen folder, Detect, fine-tuning into a typed name, scene close.

Each step asserts what the user would see. The last line printed is a JSON object of facts and timings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

TESTING = Path(__file__).resolve().parent
REPO = TESTING.parent
MODULE_DIR = REPO / "HeadCTMoLRE"
sys.path[:0] = [str(MODULE_DIR), str(TESTING)]


def _wait(widget, condition, what: str, timeout_s: float = 90.0) -> float:
    """Run the event loop (the panel's poll timer) until ``condition()``; returns the seconds it took."""
    import slicer_gui_standins as gui

    start = time.perf_counter()
    while not condition():
        if time.perf_counter() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; status: "
                                 f"{widget.ui.statusLabel.text!r}, fine-tuning: {widget.ui.fineTuneStatusLabel.text!r}")
        gui.process_events()
        time.sleep(0.02)
    return time.perf_counter() - start


def instrument_run(widget) -> dict:
    """Times of a Run as the panel sees them: the first progress message (worker started, packages imported,
    model loading begun) and the main-thread time spent showing the result (nodes, table, overlays)."""
    times: dict = {}
    progress, result = widget._onJobProgress, widget._onInferenceResult

    def on_progress(*args):
        times.setdefault("first_progress_at", time.perf_counter())
        progress(*args)

    def on_result(message):
        start = time.perf_counter()
        result(message)
        times["result_display_s"] = round(time.perf_counter() - start, 3)
        times["worker_timings_s"] = {k: round(float(v), 3) for k, v in (widget._prediction.timings_s or {}).items()}

    widget._onJobProgress, widget._onInferenceResult = on_progress, on_result
    return times


def timed_run(widget, facts: dict, timeout_s: float = 600.0) -> tuple:
    """Click Run and wait for the result; adds run_click_s, worker_first_progress_s, run_to_result_s,
    result_display_s and the worker's own timings to ``facts``. Returns what the panel showed while the job
    ran: (Run button text, progress bar shown, Fine-tune enabled, Detect enabled, the run folder)."""
    import slicer_gui_standins as gui

    times = instrument_run(widget)
    start = time.perf_counter()
    with gui.expect_no_slot_errors():
        widget.ui.applyButton.click()
        facts["run_click_s"] = round(time.perf_counter() - start, 3)
        assert widget._jobKind == "infer", f"Run did not start: {widget.ui.statusLabel.text!r}"
        ui = widget.ui
        running = (ui.applyButton.text, ui.progressBar.visible, ui.fineTuneButton.enabled, ui.detectDeviceButton.enabled,
                   str(widget._job.result_folder))
        facts["run_to_result_s"] = round(_wait(widget, lambda: widget._job is None, "the analysis", timeout_s) +
                                         facts["run_click_s"], 2)
    if "first_progress_at" in times:
        facts["worker_first_progress_s"] = round(times.pop("first_progress_at") - start, 2)
    facts.update(times)
    return running


def _no_torch(where: str) -> None:
    assert "torch" not in sys.modules or sys.modules["torch"] is None, f"torch was imported into the GUI process {where}"


def _pytorch_extension(answers: list):
    """Stand-in of the PyTorch extension's PyTorchUtils: records installTorch calls, answers from ``answers``."""
    calls = []

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=False, torchVersionRequirement=None, **kwargs):
            import slicer_gui_standins as gui

            calls.append({"askConfirmation": askConfirmation, "requirement": torchVersionRequirement,
                          "under_wait_cursor": gui.APP.overrideCursorDepth > 0})
            return answers.pop(0) if answers else None

    sys.modules["PyTorchUtils"] = types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic)
    return calls


def load_module(work: Path, slicer_python: str | None):
    """Install the stand-ins and import the module file as Slicer does; returns (module, facts)."""
    import importlib.util

    import slicer_gui_standins as gui

    facts = gui.install(str(work / "slicer-temp"), slicer_python)
    (work / "slicer-temp").mkdir(exist_ok=True)
    start = time.perf_counter()
    spec = importlib.util.spec_from_file_location("HeadCTMoLRE", MODULE_DIR / "HeadCTMoLRE.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["HeadCTMoLRE"] = module
    spec.loader.exec_module(module)
    facts["import_s"] = round(time.perf_counter() - start, 3)
    return module, facts


def open_panel(module, facts: dict):
    """What Slicer does when the module is loaded and then shown: module, widget, setup(), enter()."""
    import slicer

    import slicer_gui_standins as gui

    parent = gui.ModuleParent(str(MODULE_DIR / "HeadCTMoLRE.py"))
    module.HeadCTMoLRE(parent)
    assert parent.title == "Head CT MoLRE" and "Research use only" in parent.helpText
    assert any(sig.startswith("startupCompleted") for sig, _ in gui.APP.connected), "sample data not registered"
    start = time.perf_counter()
    with gui.expect_no_slot_errors():
        widget = module.HeadCTMoLREWidget(gui.ModuleWidgetParent())
        widget.setup()
        widget.enter()
    facts["setup_s"] = round(time.perf_counter() - start, 3)
    assert not gui.DIALOGS.shown, f"set-up opened dialogs: {gui.DIALOGS.shown}"
    return widget


def check_model_listed(widget, bundle_id: str, facts: dict) -> None:
    ui = widget.ui
    ids = [ui.modelComboBox.itemData(i) for i in range(ui.modelComboBox.count)]
    assert bundle_id in ids, f"model {bundle_id!r} is not listed; the list holds {ids}"
    facts["models"] = ids
    start = time.perf_counter()
    widget._refreshModelLists()
    facts["listing_s"] = round(time.perf_counter() - start, 3)
    ui.modelComboBox.currentIndex = ids.index(bundle_id)
    assert widget._parameterNode.modelId == bundle_id, "choosing a model in the list does not reach the parameter node"
    assert "UNTRAINED" in ui.modelStatusLabel.text and "RANDOM BACKBONE" in ui.modelStatusLabel.text, (
        f"the status label beside the model list says {ui.modelStatusLabel.text!r}")


def add_red_slice_view():
    """The axial slice view of Slicer's layout (its slice node; a new slice node is axial), which a finding's
    selection moves."""
    import slicer

    node = slicer.vtkMRMLSliceNode()
    node.SetName("Red")
    node.SetLayoutName("Red")
    node.SetSingletonTag("Red")
    return slicer.mrmlScene.AddNode(node)


def add_phantom_ct(name: str = "HeadCT"):
    """A small phantom head CT as a scalar volume node (as if loaded from a file)."""
    import slicer

    from HeadCTMoLRELib import phantoms
    from HeadCTMoLRELib.slicer import mrml

    case = phantoms.generate_phantom(["intraparenchymal_hemorrhage"], seed=3, spacing_mm=(2.0, 2.0, 8.0))
    return mrml.volume_node_from_image(slicer.mrmlScene, case.image, name)


def add_dicom_ct(series: Path):
    """The CT of a DICOM series as Slicer's DICOM module leaves it: a volume node whose "DICOM.instanceUIDs"
    attribute names the instances, and a DICOM database that maps them to files."""
    import pydicom
    import slicer

    from HeadCTMoLRELib.ct import loader
    from HeadCTMoLRELib.slicer import mrml

    volume = loader.load_ct(series)
    node = mrml.volume_node_from_image(slicer.mrmlScene, volume.image, "HeadCT (DICOM)")
    uids = []
    for path in sorted(series.glob("*.dcm")):
        uid = str(pydicom.dcmread(str(path), stop_before_pixels=True).SOPInstanceUID)
        slicer.dicomDatabase.files[uid] = str(path)
        uids.append(uid)
    node.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
    return node, uids


# ---------------------------------------------------------------------------------------------- fresh
def end_walk(facts: dict) -> dict:
    """Every walk ends here: no slot raised, and the dialogs shown go into the facts."""
    import slicer_gui_standins as gui

    assert not gui.SLOT_ERRORS, "slots raised during the walk:\n" + "\n".join(gui.SLOT_ERRORS)
    facts["dialogs"] = gui.DIALOGS.shown
    return facts


def walk_fresh(args) -> dict:
    sys.modules["torch"] = None  # unimportable: any import of torch in this process raises ImportError
    from HeadCTMoLRELib.slicer import dependencies

    real_version = dependencies.installed_version
    torch_installed = {"yes": False}
    dependencies.installed_version = (
        lambda name: (real_version(name) if torch_installed["yes"] else None) if name == "torch" else real_version(name))
    assert dependencies.torch_missing()

    module, facts = load_module(args.work, args.slicer_python)
    import slicer

    import slicer_gui_standins as gui

    installs = _pytorch_extension([None])  # the first install prompt is declined
    widget = open_panel(module, facts)
    ui = widget.ui
    check_model_listed(widget, "tiny-random", facts)
    assert ui.applyButton.text == "Run" and not ui.applyButton.enabled, "Run enabled without a CT"
    ct = add_phantom_ct()
    ui.inputVolumeSelector.setCurrentNode(ct)
    assert widget._parameterNode.inputVolume is ct, "the CT selector does not reach the parameter node"
    assert ui.applyButton.enabled, f"Run stays disabled on a fresh install: {ui.applyButton.toolTip!r}"
    ui.detectDeviceButton.click()
    assert "not installed" in ui.deviceInfoLabel.text, ui.deviceInfoLabel.text

    with gui.expect_no_slot_errors():
        ui.applyButton.click()  # the install prompt (declined)
    assert len(installs) == 1 and installs[0]["askConfirmation"], f"Run did not ask to install torch: {installs}"
    assert not installs[0]["under_wait_cursor"], "the install confirmation appeared under a wait cursor"
    assert widget._job is None and ui.applyButton.text == "Run", "a declined install still started the analysis"
    assert "not installed" in ui.dependenciesStatusLabel.text

    def accept(**kwargs):
        torch_installed["yes"] = True
        return object()  # the extension returns the torch module

    installs_accepted = _pytorch_extension([])
    sys.modules["PyTorchUtils"].PyTorchUtilsLogic.installTorch = lambda self, **kwargs: (
        installs_accepted.append(kwargs), accept(**kwargs))[1]
    gui.DIALOGS.answers["confirmOkCancelDisplay"] = [True]  # other packages, where this Python lacks any
    with gui.expect_no_slot_errors():
        ui.applyButton.click()  # accepted: the analysis starts in the worker at once
    assert installs_accepted, "the second Run did not ask to install torch"
    assert widget._jobKind == "infer" and ui.applyButton.text == "Cancel", (
        f"after the install Run did not start the analysis: {ui.statusLabel.text!r}")
    assert ui.modelComboBox.count >= 1, "the model lists are empty after the install"
    worker = widget.logic._worker.process
    run_folder = widget._job.result_folder
    ui.applyButton.click()  # Cancel
    assert widget._job is None and ui.applyButton.text == "Run" and ui.statusLabel.text == "Cancelled."
    assert worker.poll() is not None, "Cancel left the worker process running"
    assert not Path(run_folder).exists(), f"the cancelled run's folder {run_folder} is left behind"
    _no_torch("on a fresh install")
    widget.cleanup()
    return end_walk(facts)


# ----------------------------------------------------------------------------------------------- full
def walk_full(args) -> dict:
    module, facts = load_module(args.work, args.slicer_python)
    import pydicom
    import slicer

    import slicer_gui_standins as gui

    from HeadCTMoLRELib.reports import dicom as dicom_outputs

    _pytorch_extension([])
    widget = open_panel(module, facts)
    _no_torch("by the panel's set-up")
    ui = widget.ui
    check_model_listed(widget, "tiny-random", facts)
    _no_torch("by listing the models")

    # Run on a CT from a DICOM series, with a real worker process.
    red = add_red_slice_view()
    ct, uids = add_dicom_ct(args.dicom)
    ui.inputVolumeSelector.setCurrentNode(ct)
    ui.deviceComboBox.currentIndex = ui.deviceComboBox.findText("cpu")
    assert widget._parameterNode.device == "cpu"
    text, progress_shown, fine_tune_enabled, detect_enabled, run_folder = timed_run(widget, facts, timeout_s=120)
    assert text == "Cancel" and progress_shown, "Run did not turn into Cancel with a progress bar"
    assert not fine_tune_enabled and not detect_enabled, "other work allowed during a run"
    run_folder = Path(run_folder)
    assert ui.statusLabel.text.startswith("Done:"), f"the run ended with {ui.statusLabel.text!r}"
    assert "UNTRAINED" in ui.resultStatusLabel.text, f"results without the model status: {ui.resultStatusLabel.text!r}"
    assert "UNTRAINED" in ui.statusLabel.text
    assert not run_folder.exists(), f"the finished run's folder {run_folder} is left behind"
    table = ui.findingsTableView.mrmlTableNode()
    assert table is not None and table.GetNumberOfRows() == 75, "the findings table is not shown"
    assert ui.showAttentionButton.enabled and ui.exportDicomButton.enabled
    _no_torch("by showing a result")

    # Select a finding: the slice views jump to its top slice.
    ui.categoryFilterComboBox.currentIndex = ui.categoryFilterComboBox.findText("Hemorrhage")
    proxy = ui.findingsTableView.sortFilterProxyModel()
    category_column = table.GetColumnIndex("category")
    assert proxy.rowCount() and all(table.GetCellText(r, category_column) == "Hemorrhage" for r in proxy.rows()), (
        "the category filter does not filter the table")
    with gui.expect_no_slot_errors():
        ui.findingsTableView.selectRow(0)
    finding_id = proxy.index(0, table.GetColumnIndex("id")).data()
    assert widget._parameterNode.selectedFinding == finding_id
    assert "contributed most" in ui.selectedFindingLabel.text, ui.selectedFindingLabel.text
    expected_s = widget._nodes.prediction.findings()[widget._nodes.prediction.catalog.index_of(finding_id)][
        "top_slice_position_mm"][2] * 1.0  # LPS S = RAS S
    shown = float(ui.selectedFindingLabel.text.split("S = ", 1)[1].split(" mm", 1)[0])
    assert abs(shown - expected_s) < 0.1, f"the label says S = {shown} mm, the top slice is at {expected_s:.1f} mm"
    offset = red.GetSliceOffset()
    assert abs(offset - shown) < 0.5, f"the axial slice view is at S = {offset:.1f} mm, not at the top slice {shown}"
    bounds = [0.0] * 6
    ct.GetRASBounds(bounds)
    assert bounds[4] - 1e-3 <= shown <= bounds[5] + 1e-3, f"jumped to S = {shown} mm, outside the CT"
    ui.showAttentionButton.click()
    assert "attention" in ui.selectedFindingLabel.text

    # Export DICOM into a chosen (empty) folder; nothing is written anywhere else.
    export = args.work / "export"
    export.mkdir()
    gui.DIALOGS.answers["getExistingDirectory"] = [str(export)]
    with gui.expect_no_slot_errors():
        ui.exportDicomButton.click()
        assert widget._jobKind == "dicom" and not ui.applyButton.enabled
        facts["dicom_export_s"] = round(_wait(widget, lambda: widget._job is None, "the DICOM export"), 2)
    assert ui.statusLabel.text.startswith("DICOM results written"), ui.statusLabel.text
    written = sorted(p.name for p in export.iterdir())
    assert written == sorted([dicom_outputs.SR_FILE, dicom_outputs.PM_FILE, dicom_outputs.SEG_FILE]), written
    sr = pydicom.dcmread(str(export / dicom_outputs.SR_FILE))
    referenced = {item.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                  for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    assert referenced == set(uids), "the SR does not reference the DICOM series the CT was loaded from"
    assert "UNTRAINED" in sr.SeriesDescription, f"the SR does not carry the model status: {sr.SeriesDescription!r}"
    _no_torch("by the DICOM export")

    # Detect: the worker answers; torch stays out of this process.
    with gui.expect_no_slot_errors():
        ui.detectDeviceButton.click()
        facts["detect_s"] = round(_wait(widget, lambda: widget._job is None, "Detect"), 2)
    assert ui.deviceInfoLabel.text.startswith("PyTorch "), ui.deviceInfoLabel.text
    _no_torch("by Detect")

    # Fine-tune under a typed name: the new model appears in the lists, selected.
    ui.casesCsvPathLineEdit.currentPath = str(args.cases)
    assert widget._parameterNode.casesCsv == str(args.cases)
    trained_index = ui.startModelComboBox.findData(args.trained.name)
    assert trained_index >= 0, "the trained model is not in the fine-tuning list"
    ui.startModelComboBox.currentIndex = trained_index
    ui.epochsSpinBox.value = 1
    ui.outputNameLineEdit.text = "my ward model"
    assert widget._parameterNode.epochs == 1 and widget._parameterNode.outputName == "my ward model"
    assert ui.fineTuneButton.enabled, ui.fineTuneButton.toolTip
    with gui.expect_no_slot_errors():
        ui.fineTuneButton.click()
        assert ui.fineTuneButton.text == "Cancel" and not ui.applyButton.enabled
        finished_job = widget._job
        facts["fine_tune_s"] = round(_wait(widget, lambda: widget._job is None, "fine-tuning", 240), 2)
    assert ui.fineTuneStatusLabel.text.startswith("New model saved"), ui.fineTuneStatusLabel.text
    assert widget._parameterNode.modelId == "my ward model", (
        f"the fine-tuned model is not selected: {widget._parameterNode.modelId!r} of {sorted(widget._models)}; "
        f"{ui.fineTuneStatusLabel.text!r}, {finished_job.result!r}")
    assert ui.modelComboBox.currentText == "my ward model", ui.modelComboBox.currentText
    runs = Path(os.environ["HEADCT_MOLRE_MODELS"]) / ".runs"
    assert not any(runs.iterdir()), f"fine-tuning left its run folder: {list(runs.iterdir())}"
    _no_torch("by fine-tuning")

    # Scene close: results and selection gone, the panel usable again.
    with gui.expect_no_slot_errors():
        slicer.mrmlScene.Clear(0)
    assert ui.findingsTableView.mrmlTableNode() is None and not ui.exportDicomButton.enabled
    assert ui.resultStatusLabel.text == "", f"the result's status stays after the scene closed: {ui.resultStatusLabel.text!r}"
    assert not ui.applyButton.enabled, (f"Run enabled after the scene closed (input {widget._parameterNode.inputVolume}, "
                                        f"volumes {slicer.mrmlScene.GetNumberOfNodesByClass('vtkMRMLScalarVolumeNode')})")
    assert widget._parameterNode is not None and widget._parameterNode.modelId, "no parameter node after close"
    widget.cleanup()
    leftovers = sorted(Path(tempfile.gettempdir()).glob("headct-molre-run-*"))
    assert not leftovers, f"run folders left in the temp folder: {leftovers}"
    return end_walk(facts)


# --------------------------------------------------------------------------------------------- timing
def walk_timing(args) -> dict:
    """The first Run as a user does it, for docs/slicer.md: panel, listing, a CT file, the chosen model, Run."""
    module, facts = load_module(args.work, args.slicer_python)
    import slicer

    from HeadCTMoLRELib.ct import loader
    from HeadCTMoLRELib.slicer import mrml

    _pytorch_extension([])
    widget = open_panel(module, facts)
    start = time.perf_counter()
    widget._refreshModelLists()
    facts["listing_again_s"] = round(time.perf_counter() - start, 3)
    ui = widget.ui
    index = ui.modelComboBox.findData(args.model)
    assert index >= 0, f"model {args.model!r} is not listed"
    ui.modelComboBox.currentIndex = index
    volume = loader.load_ct(args.ct)
    node = mrml.volume_node_from_image(slicer.mrmlScene, volume.image, "CT")
    facts["ct_voxels"] = list(volume.image.GetSize())
    ui.inputVolumeSelector.setCurrentNode(node)
    ui.deviceComboBox.currentIndex = ui.deviceComboBox.findText(args.device)
    timed_run(widget, facts)
    _no_torch("during the timed run")
    facts["status"] = ui.statusLabel.text
    widget.cleanup()
    return facts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("fresh", "full", "timing"))
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--slicer-python", help="<Slicer source>/Base/Python: use Slicer's own wrapper and bases")
    parser.add_argument("--trained", type=Path)
    parser.add_argument("--dicom", type=Path)
    parser.add_argument("--cases", type=Path)
    parser.add_argument("--ct", type=Path, help="timing: the CT file to run on")
    parser.add_argument("--model", default="demo", help="timing: the model id (default demo)")
    parser.add_argument("--device", default="cpu", help="timing: auto, cuda or cpu (default cpu)")
    args = parser.parse_args()
    facts = {"fresh": walk_fresh, "full": walk_full, "timing": walk_timing}[args.mode](args)
    print(json.dumps(facts, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
