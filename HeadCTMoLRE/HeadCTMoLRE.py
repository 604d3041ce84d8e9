"""3D Slicer module of HeadCTMoLRE: the panel only wires widgets to the Qt-free library (HeadCTMoLRELib).

Everything shown here is computed, and turned into MRML nodes, by ``HeadCTMoLRELib.slicer.logic.HeadCTMoLRECore``,
which the test suite runs against Slicer's own core without Qt. Heavy packages (torch, transformers, peft)
are imported only inside the background worker process, after the dependency check at the first Run.
"""

import importlib
import logging
import pathlib
import tempfile
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from HeadCTMoLRELib.slicer import dependencies
from HeadCTMoLRELib.findings import CATEGORIES
from HeadCTMoLRELib.slicer.logic import HeadCTMoLRECore
from HeadCTMoLRELib.resources import resource_path

DEVICES = ["auto", "cuda", "mps", "cpu"]
EXPERT_DISPLAYS = ["outline", "fill"]
ALL_CATEGORIES = "All categories"
SAMPLE_CT_FILE = "GE_head_axial_1x1x5mm.nii.gz"
SAMPLE_CT_SHA256 = "d2b007dd7781f1927773427a6622db282fedfa08cdcc9b248f1b413c33a19fa3"


#
# HeadCTMoLRE
#


class HeadCTMoLRE(ScriptedLoadableModule):
    """Module metadata (title, category, help, acknowledgement) and sample-data registration."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Head CT MoLRE")
        self.parent.categories = ["Neuro"]
        self.parent.dependencies = []
        self.parent.contributors = ["HeadCTMoLRE developers"]
        self.parent.helpText = _("""
Detects 75 findings on non-contrast head CT (hemorrhage, vascular, trauma, mass/lesion, structural,
chronic/other) with a 2D vision foundation model adapted by LoRA and a Mixture of Low-Rank Experts (MoLRE).
It shows the probabilities in a table, the per-slice attention as a heat overlay, the router's dominant
expert per slice as a label map, and for a selected finding the slices that contributed most to it.
Fine-tuning on your own labelled cases is in the Fine-tuning section.
<p><b>Research use only. Not a medical device; not for clinical decisions.</b></p>
<p>Method: Y. Yoo et al., <i>Specializing Foundation Models via Mixture of Low-Rank Experts for Comprehensive
Head CT Analysis</i>, arXiv:2603.00675 (2026).</p>
<p>Documentation: <a href="https://github.com/HeadCTMoLRE/HeadCTMoLRE/blob/main/docs/slicer.md">docs/slicer.md</a>.</p>
""")
        self.parent.acknowledgementText = _("""
Built on 3D Slicer, PyTorch, Hugging Face transformers and peft. The bundled sample head CT comes from
the dcm_qa_ct collection (BSD-2-Clause, data credited to Aliza Medical Imaging).
""")
        iconPath = _resourceFile("Icons", "HeadCTMoLRE.png")
        if iconPath is not None:
            # The source tree keeps Resources/ beside (not inside) the module folder, where the
            # base class does not look.
            self.parent.icon = qt.QIcon(str(iconPath))
        slicer.app.connect("startupCompleted()", registerSampleData)


def _resourceFile(*parts: str) -> Optional[pathlib.Path]:
    """A file in Resources/ (source tree or installed extension), or None when it cannot be found."""
    try:
        path = resource_path(*parts)
    except FileNotFoundError as error:
        logging.warning(str(error))
        return None
    return path if path.is_file() else None


def registerSampleData():
    """Offer the bundled real head CT in the Sample Data module (loaded from the local file, checksummed)."""
    import SampleData

    samplePath = _resourceFile("Samples", SAMPLE_CT_FILE)
    if samplePath is None:
        return
    if hasattr(SampleData.SampleDataLogic, "registerCustomSampleDataCategory"):  # Slicer 5.12 and newer
        SampleData.SampleDataLogic.registerCustomSampleDataCategory("HeadCTMoLRE", title=_("Head CT MoLRE"))
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="HeadCTMoLRE",
        sampleName="HeadCTMoLRE_GE_head",
        thumbnailFileName=str(_resourceFile("Icons", "HeadCTMoLRE.png") or ""),
        uris=samplePath.as_uri(),
        fileNames=SAMPLE_CT_FILE,
        checksums=f"SHA256:{SAMPLE_CT_SHA256}",
        nodeNames="HeadCT_GE",
    )


#
# HeadCTMoLREParameterNode
#


@parameterNodeWrapper
class HeadCTMoLREParameterNode:
    """
    inputVolume - the head CT (HU) to analyse.
    modelId - id of the model bundle (from HeadCTMoLRELogic.models()).
    device - where the model runs: auto (CUDA, else MPS, else CPU), cuda, mps or cpu.
    overlayOpacity - opacity of the heat overlay (attention or a finding's contribution), 0..1.
    expertDisplay - the expert label map drawn as outline or fill.
    categoryFilter - the findings table shows this category only (or all).
    selectedFinding - id of the finding selected in the table.
    casesCsv, startModelId, epochs, outputName - fine-tuning: labelled cases CSV ("" until one is chosen),
        starting model, most epochs, name of the new model (listed under exactly this name).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelId: str = ""
    device: Annotated[str, Choice(DEVICES)] = "auto"
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    expertDisplay: Annotated[str, Choice(EXPERT_DISPLAYS)] = "outline"
    categoryFilter: Annotated[str, Choice([ALL_CATEGORIES, *CATEGORIES])] = ALL_CATEGORIES
    selectedFinding: str = ""
    casesCsv: str = ""  # a str, synchronised by hand: a pathlib.Path field shows "." in the path box
    startModelId: str = ""
    epochs: Annotated[int, WithinRange(1, 500)] = 30
    outputName: str = "my-fine-tuned-model"


#
# HeadCTMoLREWidget
#


class HeadCTMoLREWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Long work runs in the library's worker process, polled from a QTimer."""

    POLL_INTERVAL_MS = 200

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None  # the running WorkerJob or ThreadJob (one at a time: the jobs share one worker process)
        self._jobKind = None  # "infer", "fine_tune", "device" (Detect) or "dicom" (export)
        self._jobInput = None  # the CT node of a running inference
        self._nodes = None  # mrml.PredictionNodes shown in the panel
        self._prediction = None  # the inference.Prediction behind self._nodes (DICOM export)
        self._predictionInput = None  # the CT node it was made from
        self._foreground = "attention"  # which heat map is in the slice views' foreground
        self._appliedDisplay = None  # display settings last applied to self._nodes
        self._models = {}  # model id -> entry of logic.models()
        self._jobWidgets = (None, None)  # progress bar and status label of the running job
        self._pollTimer = None

    # ------------------------------------------------------------------------------------- set-up
    def setup(self) -> None:
        """Build the panel from the .ui file. Runs headless too: no dialogs, no installs, no torch."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(str(resource_path("UI", "HeadCTMoLRE.ui")))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = HeadCTMoLRELogic()
        self.ui.progressBar.hide()
        self.ui.fineTuneProgressBar.hide()
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._onPollTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.fineTuneButton.connect("clicked(bool)", self.onFineTuneButton)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModelButton)
        self.ui.detectDeviceButton.connect("clicked(bool)", self.onDetectDeviceButton)
        self.ui.exportDicomButton.connect("clicked(bool)", self.onExportDicomButton)
        self.ui.dependenciesButton.connect("clicked(bool)", self.onDependenciesButton)
        self.ui.showAttentionButton.connect("clicked(bool)", self.onShowAttentionButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.startModelComboBox.connect("currentIndexChanged(int)", self.onStartModelSelected)
        self.ui.findingsTableView.connect("selectionChanged()", self.onFindingSelected)
        self.ui.casesCsvPathLineEdit.connect("currentPathChanged(QString)", self.onCasesCsvChanged)

        self._refreshModelLists()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes: end the worker process so that nothing is left running."""
        self.removeObservers()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self._job is not None:
            self._job.cancel()
        if self.logic is not None:
            self.logic.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # Jobs keep running (and being polled) while another module is shown.
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        if self._jobKind == "infer":  # its input volume is about to disappear
            self._cancelJob()
        self.setParameterNode(None)
        self._nodes, self._prediction, self._predictionInput = None, None, None
        self.ui.findingsTableView.setMRMLTableNode(None)
        self.ui.showAttentionButton.enabled = False
        self.ui.exportDicomButton.enabled = False
        self.ui.selectedFindingLabel.text = ""
        self.ui.resultStatusLabel.text = ""

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode
        self._selectDefaultModels()

    def setParameterNode(self, inputParameterNode: Optional[HeadCTMoLREParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui are bound here; the model
            # combo boxes are filled at run time, so they are synchronised by hand.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._selectModelInCombo(self.ui.modelComboBox, self._parameterNode.modelId)
        self._selectModelInCombo(self.ui.startModelComboBox, self._parameterNode.startModelId)
        if self.ui.casesCsvPathLineEdit.currentPath != self._parameterNode.casesCsv:
            self.ui.casesCsvPathLineEdit.currentPath = self._parameterNode.casesCsv
        self._checkCanApply()
        self._applyDisplaySettings()

    def _checkCanApply(self) -> None:
        param = self._parameterNode
        idle = self._job is None
        waitFor = {"fine_tune": _("Wait for fine-tuning to end, or cancel it."),
                   "device": _("Wait for the PyTorch check to end."),
                   "dicom": _("Wait for the DICOM export to end.")}
        self.ui.detectDeviceButton.enabled = idle
        self.ui.exportDicomButton.enabled = idle and self._prediction is not None
        if self._jobKind == "infer":
            self._setButton(self.ui.applyButton, _("Cancel"), _("Stop the running analysis."), True)
        elif not idle:
            self._setButton(self.ui.applyButton, _("Run"), waitFor.get(self._jobKind, ""), False)
        elif param and param.inputVolume and param.modelId:
            self._setButton(self.ui.applyButton, _("Run"), _("Detect the 75 findings on the selected CT."), True)
        else:
            self._setButton(self.ui.applyButton, _("Run"), _("Select a head CT volume and a model."), False)

        casesReady = (param and param.casesCsv and pathlib.Path(param.casesCsv).is_file() and param.startModelId
                      and param.outputName.strip())
        if self._jobKind == "fine_tune":
            self._setButton(self.ui.fineTuneButton, _("Cancel"), _("Stop fine-tuning (no bundle is written)."), True)
        elif not idle:
            self._setButton(self.ui.fineTuneButton, _("Fine-tune"),
                            waitFor.get(self._jobKind, _("Wait for the analysis to end.")), False)
        elif casesReady:
            self._setButton(self.ui.fineTuneButton, _("Fine-tune"), _("Fine-tune the starting model on the cases."),
                            True)
        else:
            self._setButton(self.ui.fineTuneButton, _("Fine-tune"),
                            _("Select a cases CSV file, a starting model and a name for the new model."), False)

    @staticmethod
    def _setButton(button, text: str, toolTip: str, enabled: bool) -> None:
        button.text = text
        button.toolTip = toolTip
        button.enabled = enabled

    # -------------------------------------------------------------------------------------- models
    def _refreshModelLists(self, selectPath: Optional[str] = None) -> None:
        """Fill both model combo boxes from logic.models(); select the model at ``selectPath`` if given."""
        try:
            models = self.logic.models()
        except Exception as error:  # a broken manifest must not break the panel
            logging.error(f"HeadCTMoLRE could not list models: {error}")
            self.ui.statusLabel.text = _("Could not list models: {error}").format(error=error)
            models = []
        self._models = {model["id"]: model for model in models}
        for combo in (self.ui.modelComboBox, self.ui.startModelComboBox):
            wasBlocked = combo.blockSignals(True)
            combo.clear()
            for model in models:
                title = model["title"] if model.get("sha256_ok", True) else _("{title} (unusable)").format(
                    title=model["title"])
                combo.addItem(title, model["id"])
                combo.setItemData(combo.count - 1, model.get("error") or model.get("description", ""),
                                  qt.Qt.ToolTipRole)
            combo.blockSignals(wasBlocked)
        if not models:
            self.ui.modelDescriptionLabel.text = _("No model found: import a model bundle (folder or .zip).")
        if self._parameterNode is None:
            return
        selected = next((m["id"] for m in models if selectPath and m["path"] == str(selectPath)), None)
        if selected:
            self._parameterNode.modelId = selected
        self._selectDefaultModels()
        self._onParameterNodeModified()

    def _selectDefaultModels(self) -> None:
        """A model id the lists do not hold (new scene, removed bundle) falls back to the first model."""
        param = self._parameterNode
        if not self._models:
            return
        firstId = next(iter(self._models))
        if param.modelId not in self._models:
            param.modelId = firstId
        if param.startModelId not in self._models:
            param.startModelId = param.modelId

    def _selectModelInCombo(self, combo, modelId: str) -> None:
        index = combo.findData(modelId)
        if index >= 0 and index != combo.currentIndex:
            wasBlocked = combo.blockSignals(True)
            combo.currentIndex = index
            combo.blockSignals(wasBlocked)
        if combo is self.ui.modelComboBox:
            model = self._models.get(modelId)
            self.ui.modelDescriptionLabel.text = self._describeModel(model)
            self.ui.modelStatusLabel.text = self._modelStatusText((model or {}).get("status"))

    @staticmethod
    def _modelStatusText(status: Optional[dict]) -> str:
        """The bundle's status line (model.status.bundle_status): synthetic, untrained, random backbone."""
        return str((status or {}).get("label") or "")

    @staticmethod
    def _describeModel(model: Optional[dict]) -> str:
        if not model:
            return ""
        if model.get("error"):
            return _("This model cannot be used: {error}").format(error=model["error"])
        parts = [model.get("description", ""), _("Backbone: {backbone}.").format(backbone=model.get("backbone", "?"))]
        training = model.get("training") or {}
        if training.get("started_from") or training.get("cases_csv"):
            parts.append(_("Fine-tuned from {start} on {cases}.").format(
                start=training.get("started_from", "?"), cases=training.get("cases_csv", "?")))
        if model.get("synthetic"):
            parts.append(_("Trained on synthetic phantoms only: a demonstration, its findings mean nothing."))
        return " ".join(p for p in parts if p)

    def onModelSelected(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.modelId = self.ui.modelComboBox.itemData(index)

    def onStartModelSelected(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.startModelId = self.ui.startModelComboBox.itemData(index)

    def onCasesCsvChanged(self, path: str) -> None:
        if self._parameterNode and path != self._parameterNode.casesCsv:
            self._parameterNode.casesCsv = path

    def onImportModelButton(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            self.parent, _("Import a model bundle: choose its manifest.json or a .zip"), "",
            _("Model bundle (manifest.json *.zip)"))
        if not path:
            return
        if pathlib.Path(path).name == "manifest.json":
            path = str(pathlib.Path(path).parent)
        with slicer.util.tryWithErrorDisplay(_("Could not import the model bundle."), waitCursor=True):
            model = self.logic.import_model(path)
            self._refreshModelLists(selectPath=model["path"])
            self.ui.statusLabel.text = _("Imported model '{title}'.").format(title=model["title"])

    # -------------------------------------------------------------------------------- dependencies
    def onDependenciesButton(self) -> None:
        # No wait cursor: the install confirmations must look clickable.
        with slicer.util.tryWithErrorDisplay(_("Could not install the Python packages.")):
            if self._ensureDependencies():
                self.ui.dependenciesStatusLabel.text = _("PyTorch and all other packages are installed.")
                self.onDetectDeviceButton()

    def _ensureDependencies(self) -> bool:
        """Install what is missing, asking first (never in setup). False when the user declines.

        Call it outside any wait cursor (it shows confirmations). After an install the model lists are
        refreshed at once: no restart is needed."""
        if dependencies.python_too_old():
            raise RuntimeError(_("HeadCTMoLRE needs Slicer 5.10 or newer (Python 3.10+); please update Slicer."))
        installed = False
        try:
            if dependencies.torch_missing():
                if not self._installTorch():
                    self.ui.dependenciesStatusLabel.text = _("PyTorch was not installed.")
                    return False
                installed = True
            missing = dependencies.missing_requirements()
            if missing:
                if not self._installPackages(missing):
                    self.ui.dependenciesStatusLabel.text = _("Not installed: {packages}").format(
                        packages=", ".join(missing))
                    return False
                installed = True
        finally:
            if installed:
                importlib.invalidate_caches()  # new packages are importable (and listed) without a restart
                self._refreshModelLists()
        return True

    @staticmethod
    def _installTorch() -> bool:
        """torch through the PyTorch extension, which picks the build matching the NVIDIA driver."""
        try:
            import PyTorchUtils
        except ImportError as error:
            raise RuntimeError(_(
                "PyTorch is not installed and the PyTorch extension is missing. Install 'PyTorch' from the "
                "Extensions Manager, restart Slicer, then press Run again.")) from error
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=True, torchVersionRequirement=dependencies.TORCH_VERSION_SPEC)
        return torch is not None

    @staticmethod
    def _installPackages(missing: list) -> bool:
        """pip-install ``missing``, pinning Slicer's own numpy, SimpleITK, requests... (a constraints file)."""
        constraints = dependencies.write_constraints_file(
            pathlib.Path(slicer.app.temporaryPath) / "HeadCTMoLRE-constraints.txt")
        try:
            from slicer import packaging as slicerPackaging  # Slicer 5.12 and newer
        except ImportError:
            slicerPackaging = None
        if slicerPackaging is not None:
            try:
                slicerPackaging.pip_ensure(missing, constraints=str(constraints), requester="HeadCTMoLRE")
            except RuntimeError as error:  # the user declined
                logging.info(f"HeadCTMoLRE: {error}")
                return False
            return not dependencies.missing_requirements(missing)
        if not slicer.util.confirmOkCancelDisplay(
                _("HeadCTMoLRE needs these Python packages, which will be installed now:\n\n{packages}").format(
                    packages="\n".join(missing)), _("Install Python packages")):
            return False
        slicer.util.pip_install(["-c", str(constraints), *missing])
        return True

    def onDetectDeviceButton(self) -> None:
        """Show the torch build and accelerators. The background worker imports torch and answers (it then
        keeps torch loaded for the next Run); Slicer's own process never imports it."""
        if dependencies.torch_missing():
            self.ui.deviceInfoLabel.text = _(
                "PyTorch is not installed: Run installs it through the PyTorch extension.")
            return
        if self._job is not None:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not query PyTorch.")):
            self._startJob(self.logic.start_device_info(), "device", self.ui.progressBar, self.ui.deviceInfoLabel)
            self.ui.deviceInfoLabel.text = _("Asking PyTorch in the background worker...")

    def _onDeviceResult(self, message: dict) -> None:
        self.ui.deviceInfoLabel.text = self._describeDevices(message.get("device") or {})

    @staticmethod
    def _describeDevices(info: dict) -> str:
        build = info.get("torch_cuda_build")
        lines = [_("PyTorch {version} ({build} build)").format(
            version=info.get("torch", "?"), build=f"CUDA {build}" if build else "CPU-only")]
        for gpu in info.get("gpus", []):
            lines.append(_("GPU {index}: {name}, {memory} GiB").format(
                index=gpu.get("index", 0), name=gpu.get("name", "?"), memory=gpu.get("memory_gib", "?")))
        if not info.get("cuda_available"):
            lines.append(_("No CUDA GPU usable by this PyTorch build."))
        if info.get("mps_available"):
            lines.append(_("Apple MPS available."))
        return "\n".join(lines)

    # ------------------------------------------------------------------------------- inference job
    def onApplyButton(self) -> None:
        if self._jobKind == "infer":
            self._cancelJob()
            return
        with slicer.util.tryWithErrorDisplay(_("HeadCTMoLRE could not start the analysis.")):
            if not self._ensureDependencies():  # may ask to install: no wait cursor around it
                return
        with slicer.util.tryWithErrorDisplay(_("HeadCTMoLRE could not start the analysis."), waitCursor=True):
            param = self._parameterNode
            self._jobInput = param.inputVolume
            job = self.logic.start(param.inputVolume, param.modelId, device=param.device)
            self._startJob(job, "infer", self.ui.progressBar, self.ui.statusLabel)

    def _onInferenceResult(self, message: dict) -> None:
        self._showNodes(self.logic.show(self._job, ct_node=self._jobInput))
        self._prediction, self._predictionInput = self._job.prediction, self._jobInput
        label = self._prediction.status_label if self._prediction is not None else ""
        self.ui.resultStatusLabel.text = label
        done = _("Done: {count} findings above their threshold.").format(count=self._countFlagged())
        self.ui.statusLabel.text = f"{done} {label}" if label else done

    def _countFlagged(self) -> int:
        table = self._nodes.findings_table
        column = table.GetColumnIndex("flag")
        if column < 0:
            return 0
        return sum(1 for row in range(table.GetNumberOfRows()) if table.GetCellText(row, column) == "positive")

    # ------------------------------------------------------------------------------------ DICOM export
    def onExportDicomButton(self) -> None:
        """SR + Parametric Map + Segmentation of the shown result into a folder the user chooses (written in
        a background thread: nothing else is written anywhere)."""
        if self._prediction is None or self._job is not None:
            return
        folder = qt.QFileDialog.getExistingDirectory(
            self.parent, _("Export the findings as DICOM: choose an (empty) folder"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not export the DICOM results.")):
            prediction, ctNode = self._prediction, self._predictionInput
            job = self.logic.start_export_dicom(prediction, folder, ct_node=ctNode)
            self._startJob(job, "dicom", self.ui.progressBar, self.ui.statusLabel)
            self.ui.progressBar.format = _("writing DICOM files")
            self.ui.statusLabel.text = _("Writing DICOM results into {folder}...").format(folder=folder)

    def _onDicomResult(self, message: dict) -> None:
        files = message.get("files") or {}
        self.ui.statusLabel.text = _("DICOM results written: {files}").format(
            files=", ".join(str(p) for p in files.values()))

    # ------------------------------------------------------------------------------ fine-tuning job
    def onFineTuneButton(self) -> None:
        if self._jobKind == "fine_tune":
            self._cancelJob()
            return
        with slicer.util.tryWithErrorDisplay(_("HeadCTMoLRE could not start fine-tuning.")):
            if not self._ensureDependencies():  # may ask to install: no wait cursor around it
                return
        with slicer.util.tryWithErrorDisplay(_("HeadCTMoLRE could not start fine-tuning."), waitCursor=True):
            param = self._parameterNode
            job = self.logic.start_fine_tune(param.casesCsv, param.startModelId, param.epochs, param.outputName)
            self._startJob(job, "fine_tune", self.ui.fineTuneProgressBar, self.ui.fineTuneStatusLabel)

    def _onFineTuneResult(self, message: dict) -> None:
        if not message.get("bundle"):  # e.g. no epoch gave a validation AUC to keep a best model by
            self.ui.fineTuneStatusLabel.text = _(
                "Fine-tuning ended ({status}, {epochs} epoch(s)) without saving a model: no epoch improved the "
                "validation AUC. Check that the validation cases hold positives and negatives of the findings, "
                "or train longer.").format(status=message.get("status", "?"), epochs=message.get("epochs_run", 0))
            return
        self._refreshModelLists(selectPath=str(self._job.result_folder))
        self.ui.fineTuneStatusLabel.text = _("New model saved to {folder} and selected in the model list.").format(
            folder=self._job.result_folder)

    # ---------------------------------------------------------------------------- job plumbing
    def _startJob(self, job, kind: str, progressBar, statusLabel) -> None:
        """Attach the callbacks of a WorkerJob and poll it from the timer (the GUI never waits)."""
        self._job, self._jobKind = job, kind
        self._jobWidgets = (progressBar, statusLabel)
        job.on_progress = self._onJobProgress
        job.on_log = lambda text: logging.info(f"HeadCTMoLRE worker: {text}")
        job.on_result = {"infer": self._onInferenceResult, "fine_tune": self._onFineTuneResult,
                         "device": self._onDeviceResult, "dicom": self._onDicomResult}[kind]
        job.on_error = self._onJobError
        progressBar.value = 0
        progressBar.format = _("starting the worker: %p%")
        progressBar.show()
        statusLabel.text = _("Starting the background worker...")
        self._checkCanApply()
        self._pollTimer.start()

    def _onJobProgress(self, stage: str, fraction: float, details=None) -> None:
        progressBar, statusLabel = self._jobWidgets
        progressBar.value = int(round(100 * float(fraction or 0.0)))
        progressBar.format = f"{stage}: %p%"
        facts = self._describeTraining(details) if isinstance(details, dict) else ""
        statusLabel.text = f"{stage}: {facts}" if facts else str(stage)

    @staticmethod
    def _describeTraining(details: dict) -> str:
        """'epoch 3/30, loss 0.412, validation AUC 0.71' from a fine-tuning progress message."""
        facts = []
        if details.get("epoch") is not None:
            total = details.get("epochs")
            facts.append(_("epoch {epoch}").format(epoch=f"{details['epoch']}/{total}" if total else details["epoch"]))
        for key, label in (("loss", _("loss")), ("train_loss", _("training loss")),
                           ("val_mean_auc", _("validation AUC")), ("best_val_mean_auc", _("best validation AUC"))):
            if isinstance(details.get(key), (int, float)):
                facts.append(f"{label} {details[key]:.3f}")
        return ", ".join(facts)

    def _onJobError(self, message: str, errorType: str = "Error") -> None:
        logging.error(f"HeadCTMoLRE {self._jobKind} failed ({errorType}): {message}")
        self._jobWidgets[1].text = _("Failed: {message}").format(message=message)

    def _onPollTimer(self) -> None:
        job = self._job
        if job is None:
            self._pollTimer.stop()
            return
        try:
            job.poll()
        except Exception as error:  # a callback failed (e.g. showing the result): report, stop polling
            logging.exception("HeadCTMoLRE: handling the worker's message failed")
            self._jobWidgets[1].text = _("Failed: {message}").format(message=error)
            job.state = "failed"
        if job.state != "running":
            self._finishJob(job.state)

    def _cancelJob(self) -> None:
        self._jobWidgets[1].text = _("Cancelling...")
        kind = self._jobKind
        self._job.cancel()  # ends the worker's process tree and removes the job's temporary files
        self._finishJob("cancelled")
        if kind == "fine_tune":
            self._refreshModelLists()

    def _finishJob(self, state: str) -> None:
        self._pollTimer.stop()
        progressBar, statusLabel = self._jobWidgets
        if state == "cancelled":
            statusLabel.text = _("Cancelled.")
        progressBar.hide()
        self._job, self._jobKind, self._jobInput = None, None, None
        self._checkCanApply()

    # ----------------------------------------------------------------------------- results and overlays
    def _showNodes(self, nodes) -> None:
        self._nodes = nodes
        self._foreground = "attention"
        self.ui.findingsTableView.setMRMLTableNode(nodes.findings_table)
        self.ui.showAttentionButton.enabled = True
        self.ui.resultStatusLabel.text = ""
        self._appliedDisplay = None
        self._applyDisplaySettings()
        if slicer.util.mainWindow() and nodes.plot_chart is not None:
            slicer.modules.plots.logic().ShowChartInLayout(nodes.plot_chart)

    def _applyDisplaySettings(self) -> None:
        """Opacity, expert outline/fill and the category filter, from the parameter node."""
        param = self._parameterNode
        if param is None or self._nodes is None:
            return
        display = (param.overlayOpacity, param.expertDisplay, param.categoryFilter, self._foreground)
        if display == getattr(self, "_appliedDisplay", None):
            return
        self._appliedDisplay = display
        from HeadCTMoLRELib.slicer import mrml  # imported on use: keeps Slicer's start-up light

        mrml.set_overlay_opacity(slicer.mrmlScene, self._nodes, param.overlayOpacity)
        if self._foreground == "contribution":
            slicer.util.setSliceViewerLayers(foreground=self._nodes.contribution,
                                             foregroundOpacity=param.overlayOpacity)
        mrml.set_expert_display(slicer.mrmlScene, self._nodes, param.expertDisplay)
        self._applyCategoryFilter(param.categoryFilter)

    def _applyCategoryFilter(self, category: str) -> None:
        proxy = self.ui.findingsTableView.sortFilterProxyModel()
        column = self._nodes.findings_table.GetColumnIndex("category")
        if category == ALL_CATEGORIES or column < 0:
            proxy.setFilterFixedString("")
            return
        proxy.setFilterKeyColumn(column)
        proxy.setFilterFixedString(category)

    def onFindingSelected(self) -> None:
        if self._nodes is None or self._parameterNode is None:
            return
        rows = self.ui.findingsTableView.selectionModel().selectedRows()
        table = self._nodes.findings_table
        idColumn, nameColumn = table.GetColumnIndex("id"), table.GetColumnIndex("finding")
        if not rows or idColumn < 0:
            return
        # The view sorts and filters through a proxy model; read the id shown in the selected row.
        findingId = self.ui.findingsTableView.sortFilterProxyModel().index(rows[0].row(), idColumn).data()
        tableRow = next((row for row in range(table.GetNumberOfRows())
                         if table.GetCellText(row, idColumn) == findingId), None)
        if tableRow is None:  # e.g. the header row of a table shown without column titles
            return
        self._parameterNode.selectedFinding = findingId
        with slicer.util.tryWithErrorDisplay(_("Could not show the finding's contribution."), waitCursor=True):
            self._showFinding(findingId, table.GetCellText(tableRow, nameColumn) if nameColumn >= 0 else "")

    def _showFinding(self, findingId: str, findingName: str) -> None:
        """Contribution overlay of one finding; slice views jump to the slice that contributed most."""
        rasS = self.logic.select_finding(self._nodes, findingId)
        bounds = [0.0] * 6
        self._nodes.ct.GetRASBounds(bounds)
        centerR, centerA = (bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2
        slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, centerR, centerA, rasS,
                                              slicer.vtkMRMLSliceNode.OffsetJumpSlice)
        self._foreground = "contribution"
        self._applyDisplaySettings()
        self.ui.selectedFindingLabel.text = _(
            "{finding}: the slice at S = {position:.1f} mm contributed most (overlay: per-slice contribution).").format(
            finding=findingName or findingId, position=rasS)

    def onShowAttentionButton(self) -> None:
        if self._nodes is None:
            return
        self._foreground = "attention"
        slicer.util.setSliceViewerLayers(foreground=self._nodes.attention,
                                         foregroundOpacity=self._parameterNode.overlayOpacity)
        self._applyDisplaySettings()
        self.ui.selectedFindingLabel.text = _("Overlay: attention weight of each slice.")


#
# HeadCTMoLRELogic
#


class HeadCTMoLRELogic(ScriptedLoadableModuleLogic, HeadCTMoLRECore):
    """Slicer's logic base class plus the library's Qt-free logic (models, run/start, show, fine-tune).

    Batch scripts use the blocking calls: ``HeadCTMoLRELogic().run(volumeNode, "demo")``.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)  # its super().__init__() also reaches the core...
        HeadCTMoLRECore.__init__(self, scene=slicer.mrmlScene)  # ...which is given the scene explicitly here

    def getParameterNode(self):
        return HeadCTMoLREParameterNode(super().getParameterNode())


#
# HeadCTMoLRETest
#


class HeadCTMoLRETest(ScriptedLoadableModuleTest):
    """Runs the library's self-test scenarios (the same functions pytest runs against slicer-core).

    Without PyTorch or the other packages the scenarios cannot run: under ``--testing`` (CTest on a build
    machine) the test is skipped with a message saying what is missing; run interactively it fails with that
    message and what to press. Every other problem fails the test."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        reason = self._missingPackages()
        if reason and slicer.app.testingEnabled():
            # runTest is called directly (Reload and Test, slicer.selfTests): no unittest runner to skip.
            self.delayDisplay(_("HeadCTMoLRE self-test skipped: {reason}").format(reason=reason))
            return
        self.test_dependencies_present()
        self.test_scenarios()

    @staticmethod
    def _missingPackages() -> str:
        """'' when every package is installed, else what is missing."""
        missing = (["PyTorch (" + dependencies.TORCH_REQUIREMENT + ")"] if dependencies.torch_missing() else []) + \
            dependencies.missing_requirements()
        return _("not installed: {packages}").format(packages=", ".join(missing)) if missing else ""

    def _requirePackages(self) -> None:
        reason = self._missingPackages()
        if not reason:
            return
        if slicer.app.testingEnabled():
            self.skipTest(_("HeadCTMoLRE self-test skipped: {reason}").format(reason=reason))
        self.fail(_("HeadCTMoLRE self-test cannot run: {reason}. Press 'Check and install...' in the Advanced "
                    "section (PyTorch comes from the PyTorch extension).").format(reason=reason))

    def test_dependencies_present(self):
        self._requirePackages()

    def test_scenarios(self):
        self._requirePackages()
        from HeadCTMoLRELib.slicer import selftest

        scenarios = [getattr(selftest, name) for name in sorted(dir(selftest)) if name.startswith("scenario_")]
        self.assertTrue(scenarios, "HeadCTMoLRELib.slicer.selftest defines no scenario_* function.")
        for scenario in scenarios:
            self.setUp()
            self.delayDisplay(f"Running {scenario.__name__}")
            with tempfile.TemporaryDirectory(prefix="HeadCTMoLRETest-") as workdir:
                scenario(slicer.mrmlScene, workdir)
        self.delayDisplay("HeadCTMoLRE self-test passed")
