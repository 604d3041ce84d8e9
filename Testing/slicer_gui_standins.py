"""Stand-ins for the Qt side of 3D Slicer, so that HeadCTMoLRE/HeadCTMoLRE.py runs as Slicer runs it.

The desktop application (Qt, PythonQt, CTK) cannot run here. What can: slicer-core's MRML and its
``slicer.util`` (Slicer's own file, used unmodified: loadUI, childWidgetVariables, tryWithErrorDisplay,
VTKObservationMixin...), and, when a Slicer source tree is at hand, Slicer's own ``parameterNodeWrapper``,
``ScriptedLoadableModule`` and ``i18n`` (``install(slicer_python=<Slicer>/Base/Python)``). This file supplies
the rest:

* ``qt`` and ``ctk`` modules whose widget classes are built from what the module's ``.ui`` file asks for
  (``QUiLoader`` parses the Designer XML: objectName, properties, dynamic properties such as
  ``SlicerParameterName``, children), with PythonQt-style signals: ``widget.connect("clicked(bool)", slot)``
  and ``widget.clicked.connect(slot)``, emitted only when a value really changes, as Qt does;
* ``slicer.app`` (testingEnabled, temporaryPath, override cursor, translate), dialogs that record what they
  were asked and answer from a script (``Dialogs``), ``slicer.dicomDatabase`` (a uid -> file map);
* when Slicer's sources are not given: small stand-ins of ``parameterNodeWrapper`` (typed fields stored in
  the scripted module node, ``connectGui`` by ``SlicerParameterName``), ``ScriptedLoadableModule*`` and
  ``i18n.tr``, written from Slicer's documented behaviour.

Everything is installed into ``sys.modules`` of the calling process: use it in a subprocess (see
Testing/module_gui_walk.py), never in the pytest process.
"""

from __future__ import annotations

import builtins
import contextlib
import enum
import importlib.util
import inspect
import pathlib
import sys
import types
import typing
import xml.etree.ElementTree as ET

# ------------------------------------------------------------------------------------------- signals
SIGNAL_NAMES = ("moduleAboutToBeUnloaded", "startupCompleted", "directoryChanged", "clicked", "toggled", "currentIndexChanged", "currentTextChanged", "valueChanged", "textChanged",
                "currentPathChanged", "currentNodeChanged", "nodeAddedByUser", "selectionChanged", "timeout",
                "mrmlSceneChanged", "stateChanged", "editingFinished", "contentsCollapsed")

SLOT_ERRORS: list[str] = []  # exceptions raised by slots (PythonQt prints them; the walk asserts none)


def _arity(slot) -> int | None:
    """How many positional arguments ``slot`` takes (None: any), as PythonQt trims signal arguments."""
    try:
        parameters = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return None
    return sum(1 for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
               and p.default is p.empty)


class Signal:
    def __init__(self, owner):
        self._owner = owner
        self._slots: list = []

    def connect(self, slot) -> None:
        self._slots.append(slot)

    def disconnect(self, slot=None) -> None:
        self._slots = [] if slot is None else [s for s in self._slots if s != slot]

    def emit(self, *args) -> None:
        if getattr(self._owner, "_signalsBlocked", False):
            return
        for slot in list(self._slots):
            count = _arity(slot)
            try:
                slot(*(args if count is None else args[:count]))
            except Exception as error:  # noqa: BLE001 - PythonQt prints a slot's exception and goes on
                import traceback

                SLOT_ERRORS.append(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")


class QObject:
    def __init__(self, parent=None):
        self._signalsBlocked = False
        self._properties: dict = {}
        self._children: list = []
        self._parent = None
        self.name = ""  # PythonQt exposes objectName as .name too
        if parent is not None:
            parent._adopt(self)

    def __getattr__(self, name):
        if name in SIGNAL_NAMES:
            signal = Signal(self)
            object.__setattr__(self, name, signal)
            return signal
        raise AttributeError(f"{type(self).__name__} stand-in has no attribute {name!r}")

    def _adopt(self, child) -> None:
        child._parent = self
        self._children.append(child)

    def connect(self, signature: str, slot) -> None:
        getattr(self, signature.split("(", 1)[0]).connect(slot)

    def disconnect(self, signature: str, slot=None) -> None:
        getattr(self, signature.split("(", 1)[0]).disconnect(slot)

    def blockSignals(self, block: bool) -> bool:
        was, self._signalsBlocked = self._signalsBlocked, bool(block)
        return was

    def children(self) -> list:
        return list(self._children)

    def parent(self):
        return self._parent

    def findChildren(self, cls=None) -> list:
        found = []
        for child in self._children:
            if cls is None or isinstance(child, cls):
                found.append(child)
            found += child.findChildren(cls)
        return found

    def property(self, name: str):
        return self._properties.get(name)

    def setProperty(self, name: str, value) -> None:
        if hasattr(type(self), name) and isinstance(getattr(type(self), name), property):
            setattr(self, name, value)
        else:
            self._properties[name] = value

    @builtins.property  # (the method above hides the built-in inside this class body)
    def objectName(self) -> str:
        return self.name

    def setObjectName(self, name: str) -> None:
        self.name = name

    def className(self) -> str:
        return type(self).__name__


class QWidget(QObject):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.enabled = True
        self.visible = True
        self.toolTip = ""
        self.styleSheet = ""
        self._layout = None

    def show(self) -> None:
        self.visible = True

    def hide(self) -> None:
        self.visible = False

    def setEnabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)

    def isEnabled(self) -> bool:
        return self.enabled

    def layout(self):
        return self._layout

    def setLayout(self, layout) -> None:
        self._layout = layout
        layout._owner = self

    def setMRMLScene(self, scene) -> None:
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self):
        return getattr(self, "_scene", None)

    def deleteLater(self) -> None:
        pass


class QLayout(QObject):
    def __init__(self, parent=None):
        super().__init__()
        self._owner = None
        if isinstance(parent, QWidget):
            parent.setLayout(self)

    def addWidget(self, widget, *args) -> None:
        (self._owner or self)._adopt(widget)

    def addRow(self, *widgets) -> None:
        for widget in widgets:
            if isinstance(widget, QWidget):
                self.addWidget(widget)

    def addLayout(self, layout, *args) -> None:
        pass

    def addStretch(self, *args) -> None:
        pass


class QVBoxLayout(QLayout):
    pass


class QHBoxLayout(QLayout):
    pass


class QFormLayout(QLayout):
    pass


class QGridLayout(QLayout):
    pass


def _changing(attribute: str, signal: str):
    """A text property that emits ``signal`` (with the new text) only when it changes, as Qt does."""
    private = "_" + attribute

    def getter(self) -> str:
        return getattr(self, private, "")

    def setter(self, value) -> None:
        value = "" if value is None else str(value)
        if getter(self) != value:
            setattr(self, private, value)
            getattr(self, signal).emit(value)

    return property(getter, setter)


class QLabel(QWidget):
    text = _changing("text", "textChanged")
    wordWrap = False

    def setText(self, text) -> None:
        self.text = text


class QAbstractButton(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.text = ""
        self.checkable = False
        self._checked = False

    @property
    def checked(self) -> bool:
        return self._checked

    @checked.setter
    def checked(self, value) -> None:
        value = bool(value)
        if value != self._checked:
            self._checked = value
            self.toggled.emit(value)

    def setChecked(self, value) -> None:
        self.checked = value

    def isChecked(self) -> bool:
        return self._checked

    def click(self) -> None:
        """What a user's click does: nothing on a disabled button, else clicked(checked)."""
        if not self.enabled or not self.visible:
            return
        if self.checkable:
            self.checked = not self.checked
        self.clicked.emit(self.checked)


class QPushButton(QAbstractButton):
    pass


class QCheckBox(QAbstractButton):
    pass


class QProgressBar(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.value, self.format, self.minimum, self.maximum = 0, "%p%", 0, 100


class QLineEdit(QWidget):
    text = _changing("text", "textChanged")

    def setText(self, text) -> None:
        self.text = text


class QTextEdit(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._plain = ""

    def toPlainText(self) -> str:
        return self._plain

    def setPlainText(self, text) -> None:
        if text != self._plain:
            self._plain = text
            self.textChanged.emit()


class _Range(QWidget):
    """Spin boxes and sliders: value clamped to [minimum, maximum], valueChanged on change."""

    _integer = False

    def __init__(self, parent=None):
        super().__init__(parent)
        self.minimum, self.maximum, self.singleStep, self.decimals = 0, 99 if self._integer else 99.99, 1, 2
        self._value = 0

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, value) -> None:
        value = min(max(value, self.minimum), self.maximum)
        value = int(round(value)) if self._integer else float(value)
        if value != self._value:
            self._value = value
            self.valueChanged.emit(value)

    def setValue(self, value) -> None:
        self.value = value

    def setMinimum(self, value) -> None:
        self.minimum = value

    def setMaximum(self, value) -> None:
        self.maximum = value

    def setRange(self, low, high) -> None:
        self.minimum, self.maximum = low, high


class QSpinBox(_Range):
    _integer = True


class QSlider(_Range):
    _integer = True


class QDoubleSpinBox(_Range):
    pass


class QComboBox(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._items: list[dict] = []
        self._index = -1

    @property
    def count(self) -> int:
        return len(self._items)

    @property
    def currentIndex(self) -> int:
        return self._index

    @currentIndex.setter
    def currentIndex(self, index) -> None:
        index = int(index) if 0 <= int(index) < len(self._items) else -1
        if index != self._index:
            self._index = index
            self.currentIndexChanged.emit(index)
            self.currentTextChanged.emit(self.currentText)

    def setCurrentIndex(self, index) -> None:
        self.currentIndex = index

    @property
    def currentText(self) -> str:
        return self._items[self._index]["text"] if self._index >= 0 else ""

    def addItem(self, text, data=None) -> None:
        self._items.append({"text": str(text), "data": data, "roles": {}})
        if self._index < 0:
            self.currentIndex = 0

    def clear(self) -> None:
        self._items = []
        if self._index != -1:
            self._index = -1
            self.currentIndexChanged.emit(-1)

    def itemText(self, index) -> str:
        return self._items[index]["text"]

    def itemData(self, index, role=None):
        item = self._items[index]
        return item["data"] if role in (None, Qt.UserRole) else item["roles"].get(role)

    def setItemData(self, index, value, role=None) -> None:
        if role in (None, Qt.UserRole):
            self._items[index]["data"] = value
        else:
            self._items[index]["roles"][role] = value

    def findData(self, data) -> int:
        return next((i for i, item in enumerate(self._items) if item["data"] == data), -1)

    def findText(self, text) -> int:
        return next((i for i, item in enumerate(self._items) if item["text"] == text), -1)


class QTimer(QObject):
    """Fired by ``process_events()`` (the walk's event loop), never by a real clock."""

    ACTIVE: list = []

    def __init__(self, parent=None):
        super().__init__(parent)
        self.interval = 0
        self.singleShot = False

    def setInterval(self, ms) -> None:
        self.interval = ms

    def start(self, ms=None) -> None:
        if self not in QTimer.ACTIVE:
            QTimer.ACTIVE.append(self)

    def stop(self) -> None:
        if self in QTimer.ACTIVE:
            QTimer.ACTIVE.remove(self)

    def isActive(self) -> bool:
        return self in QTimer.ACTIVE


class QIcon:
    def __init__(self, path=""):
        self.path = str(path)


class QSettings:
    _values: dict = {}

    def value(self, key, default=None):
        return self._values.get(key, default)

    def setValue(self, key, value) -> None:
        self._values[key] = value

    def contains(self, key) -> bool:
        return key in self._values


class QColor:
    def __init__(self, *args):
        self.args = args


class Qt:
    UserRole, DisplayRole, ToolTipRole = 0x0100, 0, 3
    WaitCursor = 16
    ShiftModifier = 0x02000000


class QFile:
    ReadOnly = 1

    def __init__(self, path):
        self.path = pathlib.Path(str(path))

    def exists(self) -> bool:
        return self.path.is_file()

    def open(self, mode) -> bool:
        return self.exists()


class QUiLoader:
    """Builds stand-in widgets from a Qt Designer file: classes, names, properties, dynamic properties."""

    def load(self, qfile):
        root = ET.parse(qfile.path).getroot().find("widget")
        return _build_widget(root, None)


def _property_value(element):
    for child in element:
        tag, text = child.tag, (child.text or "")
        if tag == "string":
            return text
        if tag == "bool":
            return text.strip() == "true"
        if tag == "number":
            return int(text)
        if tag == "double":
            return float(text)
        if tag == "stringlist":
            return [s.text or "" for s in child.findall("string")]
        if tag in ("enum", "set", "cstring"):
            return text
        return None  # size, rect, font...: not used by the module
    return None


# Designer properties applied in this order: range limits before the value they limit.
_PROPERTY_ORDER = {"minimum": 0, "maximum": 0, "singleStep": 1, "decimals": 1, "value": 2}


def _build_widget(element, parent):
    cls_name = element.get("class")
    cls = _widget_class(cls_name)
    widget = cls()
    widget.name = element.get("name") or ""
    properties = [(p.get("name"), p.get("stdset") == "0", _property_value(p)) for p in element.findall("property")]
    for name, dynamic, value in sorted(properties, key=lambda p: _PROPERTY_ORDER.get(p[0], 3)):
        if value is None:
            continue
        if dynamic:
            widget._properties[name] = value
        elif name == "enabled":
            widget.enabled = value
        else:
            try:
                setattr(widget, name, value)
            except AttributeError:
                widget._properties[name] = value
    if parent is not None:
        parent._adopt(widget)
    _build_children(element, widget)
    return widget


def _build_children(element, widget) -> None:
    for child in element:
        if child.tag == "widget":
            _build_widget(child, widget)
        elif child.tag in ("layout", "item"):
            _build_children(child, widget)


# ------------------------------------------------------------------------------------- MRML widgets
class qMRMLWidget(QWidget):
    pass


class qSlicerWidget(QWidget):
    pass


class qMRMLNodeComboBox(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.nodeTypes = []
        self._node = None
        self._scene = None

    def setMRMLScene(self, scene) -> None:
        self._scene = scene
        if scene is None:
            self.setCurrentNode(None)

    def currentNode(self):
        if self._node is not None and self._scene is not None and self._scene.GetNodeByID(self._node.GetID()) is None:
            self._node = None  # removed from the scene (scene close)
        return self._node

    def setCurrentNode(self, node) -> None:
        if node is not self._node:
            self._node = node
            self.currentNodeChanged.emit(node)

    def setCurrentNodeID(self, node_id) -> None:
        self.setCurrentNode(self._scene.GetNodeByID(node_id) if node_id else None)

    def currentNodeID(self) -> str:
        return self._node.GetID() if self._node is not None else ""


class _ModelIndex:
    def __init__(self, value, row: int):
        self._value, self._row = value, row

    def data(self):
        return self._value

    def row(self) -> int:
        return self._row


class _SortFilterProxy:
    """Rows of a table node, filtered like QSortFilterProxyModel.setFilterFixedString on one column."""

    def __init__(self, view):
        self._view = view
        self.filter, self.column = "", 0

    def setFilterFixedString(self, text) -> None:
        self.filter = str(text)

    def setFilterKeyColumn(self, column) -> None:
        self.column = int(column)

    def rows(self) -> list[int]:
        table = self._view.mrmlTableNode()
        if table is None:
            return []
        return [r for r in range(table.GetNumberOfRows())
                if not self.filter or self.filter in table.GetCellText(r, self.column)]

    def rowCount(self) -> int:
        return len(self.rows())

    def index(self, row, column):
        return _ModelIndex(self._view.mrmlTableNode().GetCellText(self.rows()[row], column), row)


class _SelectionModel:
    def __init__(self):
        self.rows: list[int] = []

    def selectedRows(self):
        return [_ModelIndex(None, r) for r in self.rows]


class qMRMLTableView(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._table = None
        self._proxy = _SortFilterProxy(self)
        self._selection = _SelectionModel()

    def setMRMLTableNode(self, node) -> None:
        self._table = node
        self._selection.rows = []

    def mrmlTableNode(self):
        return self._table

    def sortFilterProxyModel(self):
        return self._proxy

    def selectionModel(self):
        return self._selection

    def selectRow(self, row: int) -> None:
        """What a user's click on a (shown, filtered) row does."""
        self._selection.rows = [row]
        self.selectionChanged.emit()


class qMRMLSliderWidget(_Range):
    pass


class qMRMLSpinBox(_Range):
    pass


class qMRMLRangeWidget(QWidget):
    pass


# --------------------------------------------------------------------------------------------- ctk
class ctkCollapsibleButton(QAbstractButton):
    collapsed = False


class ctkSliderWidget(_Range):
    pass


class ctkDoubleSpinBox(_Range):
    pass


class ctkDoubleSlider(_Range):
    pass


class ctkPathLineEdit(QWidget):
    currentPath = _changing("currentPath", "currentPathChanged")
    Files, Dirs = 1, 2

    def __init__(self, parent=None):
        super().__init__(parent)
        self.filters, self.nameFilters = 0, []


class ctkDirectoryButton(QWidget):
    directory = _changing("directory", "directoryChanged")


class ctkComboBox(QComboBox):
    pass


class ctkCheckBox(QCheckBox):
    pass


class ctkCheckablePushButton(QPushButton):
    checkBoxControlsButtonToggleState = False


QT_CLASSES = [QObject, QWidget, QLayout, QVBoxLayout, QHBoxLayout, QFormLayout, QGridLayout, QLabel, QPushButton,
              QCheckBox, QProgressBar, QLineEdit, QTextEdit, QSpinBox, QSlider, QDoubleSpinBox, QComboBox, QTimer,
              QIcon, QSettings, QColor, Qt, QFile, QUiLoader]
CTK_CLASSES = [ctkCollapsibleButton, ctkSliderWidget, ctkDoubleSpinBox, ctkDoubleSlider, ctkPathLineEdit,
               ctkDirectoryButton, ctkComboBox, ctkCheckBox, ctkCheckablePushButton]
MRML_WIDGET_CLASSES = [qMRMLWidget, qSlicerWidget, qMRMLNodeComboBox, qMRMLTableView, qMRMLSliderWidget,
                       qMRMLSpinBox, qMRMLRangeWidget]


def _placeholder(module_name: str):
    """Module ``__getattr__``: classes the module never touches (isinstance checks of Slicer's connectors)."""
    made = {}

    def getattr_(name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name not in made:
            made[name] = type(name, (QWidget,), {"__module__": module_name})
        return made[name]

    return getattr_


def _widget_class(name: str):
    for cls in QT_CLASSES + CTK_CLASSES + MRML_WIDGET_CLASSES:
        if cls.__name__ == name:
            return cls
    raise KeyError(f"the .ui file uses widget class {name}, which has no stand-in in {__file__}; add one.")


# ------------------------------------------------------------------------------- application, dialogs
class Dialogs:
    """Every dialog the module opens, recorded; answers come from ``answers`` (a list per kind)."""

    def __init__(self):
        self.shown: list[tuple[str, str]] = []
        self.answers: dict[str, list] = {}
        self.under_wait_cursor: list[str] = []

    def ask(self, kind: str, text: str, default):
        self.shown.append((kind, str(text)))
        if APP.overrideCursorDepth:
            self.under_wait_cursor.append(f"{kind}: {text}")
        queue = self.answers.get(kind) or []
        return queue.pop(0) if queue else default


DIALOGS = Dialogs()


class _ModuleManager(QObject):
    pass


class Application(QObject):
    def __init__(self, temporary_path: str):
        super().__init__()
        self.temporaryPath = temporary_path
        self.slicerHome = None
        self.testing = False
        self.overrideCursorDepth = 0
        self._moduleManager = _ModuleManager()

    def testingEnabled(self) -> bool:
        return self.testing

    def setOverrideCursor(self, cursor) -> None:
        self.overrideCursorDepth += 1

    def restoreOverrideCursor(self) -> None:
        self.overrideCursorDepth -= 1

    def moduleManager(self):
        return self._moduleManager

    def translate(self, context, text):
        return text

    def processEvents(self) -> None:
        process_events()

    def connect(self, signature, slot) -> None:
        self.connected = getattr(self, "connected", []) + [(signature, slot)]


APP: Application | None = None


class DicomDatabase:
    """``slicer.dicomDatabase`` as the DICOM module leaves it: instance UID -> file."""

    def __init__(self):
        self.files: dict[str, str] = {}

    def fileForInstance(self, uid: str) -> str:
        return self.files.get(uid, "")


def process_events() -> None:
    """One turn of the event loop: every active timer fires once."""
    for timer in list(QTimer.ACTIVE):
        if timer.isActive():
            timer.timeout.emit()


# ---------------------------------------------------------- stand-ins of Slicer's scripted-module sources
def _standin_i18n() -> types.ModuleType:
    module = types.ModuleType("slicer.i18n")
    module.tr = lambda text: text
    module.translate = lambda context, text: text
    return module


def _standin_scripted_loadable_module() -> types.ModuleType:
    """ScriptedLoadableModule* as Slicer documents them (Base/Python/slicer/ScriptedLoadableModule.py)."""
    import unittest

    import slicer

    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
            self.moduleName = type(self).__name__
            parent.title, parent.categories, parent.dependencies, parent.contributors = "", [], [], []
            parent.helpText = parent.acknowledgementText = ""
            if not hasattr(slicer, "selfTests"):
                slicer.selfTests = {}
            slicer.selfTests[self.moduleName] = self.runTest

        def runTest(self, msec=100, **kwargs):
            module_ = sys.modules[type(self).__module__]
            getattr(module_, self.moduleName + "Test")().runTest(**kwargs)

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__.removesuffix("Widget")
            self.developerMode = False
            self.parent = parent or slicer.qMRMLWidget()
            if self.parent.layout() is None:
                self.parent.setLayout(sys.modules["qt"].QVBoxLayout())
            self.layout = self.parent.layout()
            slicer.app.moduleManager().connect("moduleAboutToBeUnloaded(QString)", self._onModuleAboutToBeUnloaded)

        def _onModuleAboutToBeUnloaded(self, moduleName):
            if moduleName == self.moduleName:
                self.cleanup()

        def setup(self):
            pass

        def cleanup(self):
            pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            super().__init__()
            self.moduleName = type(self).__name__.removesuffix("Logic")

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
                node.UnRegister(None)
                node.SetSingletonTag(self.moduleName)
                node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
                node = slicer.mrmlScene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=100):
            print(message)

    module.ScriptedLoadableModule = ScriptedLoadableModule
    module.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    module.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    module.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    return module


def _standin_parameter_node_wrapper() -> types.ModuleType:
    """@parameterNodeWrapper for the field types the module uses: str/int/float/bool with Default, Choice,
    WithinRange, and MRML node classes; values live in the vtkMRMLScriptedModuleNode (parameters and node
    references, as Slicer stores them); connectGui binds widgets by their SlicerParameterName property."""
    import slicer

    module = types.ModuleType("slicer.parameterNodeWrapper")

    class Choice:
        def __init__(self, choices):
            self.choices = list(choices)

        def validate(self, value):
            if value not in self.choices:
                raise ValueError(f"{value!r} is not one of {self.choices}")

    class WithinRange:
        def __init__(self, minimum, maximum):
            self.minimum, self.maximum = minimum, maximum

        def validate(self, value):
            if not self.minimum <= value <= self.maximum:
                raise ValueError(f"{value!r} is not within [{self.minimum}, {self.maximum}]")

    class Default:
        def __init__(self, value):
            self.value = value

    def split(annotation):
        if typing.get_origin(annotation) is typing.Annotated:
            return annotation.__origin__, list(annotation.__metadata__)
        return annotation, []

    def is_node(cls) -> bool:
        return isinstance(cls, type) and issubclass(cls, slicer.vtkMRMLNode)

    class Field:
        def __init__(self, name, annotation, default):
            self.name = name
            self.type, self.annotations = split(annotation)
            explicit = next((a.value for a in self.annotations if isinstance(a, Default)), None)
            self.default = default if default is not None else explicit
            if self.default is None and not is_node(self.type):
                self.default = self.type()

        def read(self, node):
            if is_node(self.type):
                return node.GetNodeReference(self.name)
            if self.name not in node.GetParameterNames():
                return self.default
            text = node.GetParameter(self.name)
            return text == "True" if self.type is bool else self.type(text)

        def write(self, node, value):
            if is_node(self.type):
                if value is not None and not isinstance(value, self.type):
                    raise TypeError(f"{self.name} must be a {self.type.__name__}, got {type(value).__name__}")
                node.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
                return
            value = self.type(value)
            for annotation in self.annotations:
                if hasattr(annotation, "validate"):
                    annotation.validate(value)
            node.SetParameter(self.name, str(value))

    class Connector:
        """Widget <-> field, for the widget kinds of the .ui; ``changed`` writes the widget's value."""

        def __init__(self, wrapper, field, widget):
            self.wrapper, self.field, self.widget = wrapper, field, widget
            choice = next((a for a in field.annotations if isinstance(a, Choice)), None)
            self.choices = choice.choices if choice else None
            if isinstance(widget, QComboBox):
                if self.choices is None:
                    raise RuntimeError("a combo box needs the Choice annotation")
                widget.clear()
                for value in self.choices:
                    widget.addItem(str(value))
            limits = next((a for a in field.annotations if isinstance(a, WithinRange)), None)
            if limits and isinstance(widget, _Range):
                widget.setRange(limits.minimum, limits.maximum)
            self.signal = {QComboBox: "currentIndexChanged", qMRMLNodeComboBox: "currentNodeChanged",
                           QLineEdit: "textChanged", ctkPathLineEdit: "currentPathChanged"}.get(
                               next((c for c in (QComboBox, qMRMLNodeComboBox, QLineEdit, ctkPathLineEdit)
                                     if isinstance(widget, c)), None), "valueChanged")
            getattr(widget, self.signal).connect(self.changed)

        def read(self):
            w = self.widget
            if isinstance(w, QComboBox):
                return self.choices[w.currentIndex]
            if isinstance(w, qMRMLNodeComboBox):
                return w.currentNode()
            if isinstance(w, QLineEdit):
                return w.text
            return w.value

        def write(self, value):
            w = self.widget
            was = w.blockSignals(True)
            try:
                if isinstance(w, QComboBox):
                    w.currentIndex = self.choices.index(value)
                elif isinstance(w, qMRMLNodeComboBox):
                    w.setCurrentNode(value)
                elif isinstance(w, QLineEdit):
                    w.text = value
                else:
                    w.value = value
            finally:
                w.blockSignals(was)

        def changed(self, *args):
            setattr(self.wrapper, self.field.name, self.read())

        def disconnect(self):
            getattr(self.widget, self.signal).disconnect(self.changed)

    def parameterNodeWrapper(cls):
        hints = typing.get_type_hints(cls, include_extras=True)
        fields = {name: Field(name, hint, cls.__dict__.get(name)) for name, hint in hints.items()}

        def __init__(self, node):
            object.__setattr__(self, "parameterNode", node)
            object.__setattr__(self, "_guis", {})
            with slicer.util.NodeModify(node):
                for field in fields.values():
                    if not is_node(field.type) and field.name not in node.GetParameterNames():
                        field.write(node, field.default)

        def __getattr__(self, name):
            if name in fields:
                return fields[name].read(self.parameterNode)
            raise AttributeError(name)

        def __setattr__(self, name, value):
            if name not in fields:
                raise AttributeError(f"{cls.__name__} has no parameter {name!r}")
            fields[name].write(self.parameterNode, value)
            for connectors in self._guis.values():
                if name in connectors:
                    connectors[name].write(fields[name].read(self.parameterNode))

        def connectGui(self, gui):
            tag = object()
            connectors = {}
            for widget in vars(gui).values():
                name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
                if name:
                    if name not in fields:
                        raise ValueError(f"widget {widget.name} is bound to unknown parameter {name!r}")
                    connectors[name] = Connector(self, fields[name], widget)
                    connectors[name].write(fields[name].read(self.parameterNode))
            self._guis[tag] = connectors
            return tag

        def disconnectGui(self, tag):
            for connector in self._guis.pop(tag, {}).values():
                connector.disconnect()

        def __bool__(self):
            return True

        members = {"__init__": __init__, "__getattr__": __getattr__, "__setattr__": __setattr__,
                   "connectGui": connectGui, "disconnectGui": disconnectGui, "__bool__": __bool__,
                   "__doc__": cls.__doc__, "__module__": cls.__module__,
                   "AddObserver": lambda self, *a: self.parameterNode.AddObserver(*a),
                   "RemoveObserver": lambda self, *a: self.parameterNode.RemoveObserver(*a)}
        return type(cls.__name__, (), members)

    module.parameterNodeWrapper = parameterNodeWrapper
    module.Choice, module.WithinRange, module.Default = Choice, WithinRange, Default
    module.Minimum = module.Maximum = WithinRange
    return module


# --------------------------------------------------------------------------------------------- install
def _load_package(name: str, folder: pathlib.Path) -> types.ModuleType:
    """Import Slicer's own Python package or module ``slicer.<name>`` from a source tree's Base/Python/slicer."""
    path = folder / name / "__init__.py" if (folder / name).is_dir() else folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(
        f"slicer.{name}", path, submodule_search_locations=[str(folder / name)] if path.name == "__init__.py" else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"slicer.{name}"] = module
    spec.loader.exec_module(module)
    return module


def install(temporary_path: str, slicer_python: str | None = None) -> dict:
    """Make ``import qt, ctk, slicer`` behave as in Slicer's GUI. slicer_python: <Slicer source>/Base/Python,
    whose i18n, parameterNodeWrapper and ScriptedLoadableModule are then used instead of the stand-ins.
    Returns {"sources": "slicer" | "stand-ins"}."""
    global APP
    qt = types.ModuleType("qt")
    for cls in QT_CLASSES:
        setattr(qt, cls.__name__, cls)
    qt.QFileDialog = types.SimpleNamespace(
        getOpenFileName=lambda *a, **k: DIALOGS.ask("getOpenFileName", a[1] if len(a) > 1 else "", ""),
        getExistingDirectory=lambda *a, **k: DIALOGS.ask("getExistingDirectory", a[1] if len(a) > 1 else "", ""))
    qt.__getattr__ = _placeholder("qt")
    ctk = types.ModuleType("ctk")
    for cls in CTK_CLASSES:
        setattr(ctk, cls.__name__, cls)
    ctk.__getattr__ = _placeholder("ctk")
    sys.modules["qt"], sys.modules["ctk"] = qt, ctk

    import slicer
    import slicer.util

    for cls in MRML_WIDGET_CLASSES:
        setattr(slicer, cls.__name__, cls)
    APP = Application(temporary_path)
    slicer.app = APP
    slicer.dicomDatabase = DicomDatabase()
    slicer.modules = types.SimpleNamespace()
    if getattr(slicer, "mrmlScene", None) is None:
        slicer.mrmlScene = slicer.vtkMRMLScene()
    # Dialogs: recorded and answered from DIALOGS (slicer.util's own functions open QMessageBoxes).
    slicer.util.errorDisplay = lambda text, *a, **k: DIALOGS.ask("errorDisplay", text, None)
    slicer.util.warningDisplay = lambda text, *a, **k: DIALOGS.ask("warningDisplay", text, None)
    slicer.util.infoDisplay = lambda text, *a, **k: DIALOGS.ask("infoDisplay", text, None)
    slicer.util.confirmOkCancelDisplay = lambda text, *a, **k: DIALOGS.ask("confirmOkCancelDisplay", text, False)
    slicer.util.confirmYesNoDisplay = lambda text, *a, **k: DIALOGS.ask("confirmYesNoDisplay", text, False)
    slicer.util.pip_install = lambda *a, **k: DIALOGS.ask("pip_install", str(a), None)
    slicer.util.mainWindow = lambda *a, **k: None
    slicer.util.delayDisplay = lambda message, *a, **k: print(message)

    if slicer_python:
        folder = pathlib.Path(slicer_python) / "slicer"
        slicer.i18n = _load_package("i18n", folder)
        slicer.parameterNodeWrapper = _load_package("parameterNodeWrapper", folder)
        slicer.ScriptedLoadableModule = _load_package("ScriptedLoadableModule", folder)
        sources = "slicer"
    else:
        for name, make in (("i18n", _standin_i18n), ("parameterNodeWrapper", _standin_parameter_node_wrapper),
                           ("ScriptedLoadableModule", _standin_scripted_loadable_module)):
            module = make()
            sys.modules[f"slicer.{name}"] = module
            setattr(slicer, name, module)
        sources = "stand-ins"
    return {"sources": sources}


class ModuleWidgetParent(qMRMLWidget):
    """The panel Slicer gives a module widget (qSlicerScriptedLoadableModuleWidget): ``isEntered`` while shown."""

    def __init__(self):
        super().__init__()
        self.isEntered = True
        self.setLayout(QVBoxLayout())


class ModuleParent(QObject):
    """What Slicer gives a scripted module's constructor: title, categories, help... and ``path``."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.isEntered = True
        self.icon = None


@contextlib.contextmanager
def expect_no_slot_errors():
    before = len(SLOT_ERRORS)
    yield
    new = SLOT_ERRORS[before:]
    if new:
        raise AssertionError("a slot raised (PythonQt would print it and the click would do nothing):\n"
                             + "\n".join(new))


__all__ = ["install", "process_events", "DIALOGS", "SLOT_ERRORS", "ModuleParent", "ModuleWidgetParent",
           "expect_no_slot_errors"]
_ = enum  # (enum fields would be handled by Slicer's own wrapper; the module uses none)
