"""Consistency checks of the Android project (android_demo/) that run without an Android SDK: the library module
stays JVM-pure, the manifests name classes, resources and themes that exist, the version catalog holds every alias
the build files use, the native build's paths and targets line up, BenchActivity's extras are BenchRun's, and
kotlinc compiles the JVM-pure sources and finds no syntax error and no misspelt name of our own in the Android ones.
(What cannot be checked here, the Gradle build, the APK and the NDK link, is listed in android_demo/README.md.)"""

import os
import re
import subprocess
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from cosmoes.bench.devices import APP_ACTIVITY, APP_EXTRAS, APP_PACKAGE, APP_SWITCHES
from tests.android_demo.jvm import JAVA_HOME, tools

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ROOT / "android_demo"
LIBRARY = PROJECT / "cosmoes" / "src" / "main"
APP = PROJECT / "app" / "src" / "main"
APP_KOTLIN = APP / "kotlin" / "org" / "cosmoes" / "demo"
# App sources that use no Android API, so kotlinc must compile them here without a single error
PURE_APP_SOURCES = ("Bundles.kt", "ChatState.kt")
ANDROID_NS = "{http://schemas.android.com/apk/res/android}"
# Members of Android classes the app's sources call on an implicit receiver (Activity, AndroidViewModel, Context,
# Bundle, DocumentFile): kotlinc cannot resolve them without android.jar. A new one goes here.
PLATFORM_MEMBERS = {"contentResolver", "filesDir", "finish", "get", "getApplication", "getExternalFilesDir", "intent",
                    "keySet", "listFiles", "onCreate", "runOnUiThread", "window", "R"}
# What a missing android.jar / androidx classpath makes kotlinc report besides unresolved names
CASCADES = ("cannot infer type", "inapplicable because of a receiver type mismatch", "Unresolved qualified name",
            "is ambiguous for this expression", "needs opt-in")


def kotlin_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.kt"))


def code_lines(path: Path) -> list[str]:
    """The lines of a Kotlin file with // and /* */ comments blanked (string contents kept)."""
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group().count("\n"), path.read_text(), flags=re.S)
    return [re.sub(r"//.*", "", line) for line in text.splitlines()]


def jvm_pure_sources() -> list[Path]:
    return kotlin_files(LIBRARY / "kotlin") + [APP_KOTLIN / name for name in PURE_APP_SOURCES]


def test_library_module_and_pure_app_sources_use_no_android_api():
    sources = jvm_pure_sources()
    assert len(sources) > len(PURE_APP_SOURCES), "no library sources found"
    for path in sources:
        for number, line in enumerate(code_lines(path), 1):
            assert not re.search(r"\bandroidx?\.[a-z]", line), f"{path.relative_to(ROOT)}:{number}: {line.strip()}"


def app_namespace() -> str:
    build = (PROJECT / "app" / "build.gradle.kts").read_text()
    return re.search(r'namespace = "([^"]+)"', build).group(1)


def declared_classes() -> dict[str, str]:
    """Fully qualified name -> superclass of every top-level class in the app's Kotlin sources."""
    found = {}
    for path in kotlin_files(APP / "kotlin"):
        text = path.read_text()
        package = re.search(r"^package ([\w.]+)", text, re.M).group(1)
        for name, parent in re.findall(r"^class (\w+)[^:\n{]*:\s*(\w+)\(", text, re.M):
            found[f"{package}.{name}"] = parent
    return found


def test_manifest_activities_are_classes_of_the_app():
    manifest = ET.parse(APP / "AndroidManifest.xml").getroot()
    namespace, classes = app_namespace(), declared_classes()
    assert namespace == APP_PACKAGE  # the package `cosmoes bench --app` starts
    activities = {}
    for activity in manifest.iter("activity"):
        name = activity.get(f"{ANDROID_NS}name")
        full = namespace + name if name.startswith(".") else name
        assert classes.get(full) in {"Activity", "ComponentActivity"}, f"{name}: no Activity class {full} in app/src"
        activities[full] = activity
    launcher = [a for a in activities.values()
                if {c.get(f"{ANDROID_NS}name") for c in a.iter("category")} == {"android.intent.category.LAUNCHER"}]
    assert [a.get(f"{ANDROID_NS}name") for a in launcher] == [".MainActivity"]
    bench = activities[namespace + "." + APP_ACTIVITY.split("/.")[1]]
    assert bench.get(f"{ANDROID_NS}exported") == "true"  # `adb shell am start` comes from outside the app


def resource_names(kind: str) -> set[str]:
    names = set()
    for path in (APP / "res" / "values").glob("*.xml"):
        names |= {e.get("name") for e in ET.parse(path).getroot() if e.tag == kind}
    return names


def test_resources_the_sources_and_manifest_name_exist():
    strings, styles = resource_names("string"), resource_names("style")
    used = set(re.findall(r"@string/(\w+)", (APP / "AndroidManifest.xml").read_text()))
    for path in kotlin_files(APP / "kotlin"):
        used |= set(re.findall(r"\bR\.string\.(\w+)", path.read_text()))
    assert used and used <= strings, f"missing strings: {sorted(used - strings)}"
    themes = set(re.findall(r"@style/([\w.]+)", (APP / "AndroidManifest.xml").read_text()))
    assert themes and themes <= styles, f"missing styles: {sorted(themes - styles)}"
    for element in ET.parse(APP / "res" / "values" / "strings.xml").getroot():
        # aapt2 refuses an unescaped apostrophe or double quote inside a string resource
        assert not re.search(r"(?<!\\)['\"]", element.text or ""), f"string {element.get('name')}: escape ' and \""


def catalog_aliases() -> dict[str, set[str]]:
    """The accessors of gradle/libs.versions.toml per section: Gradle turns '-', '_' and '.' in aliases into '.'."""
    catalog = tomllib.loads((PROJECT / "gradle" / "libs.versions.toml").read_text())
    return {section: {re.sub(r"[-_.]", ".", alias) for alias in catalog.get(section, {})}
            for section in ("versions", "libraries", "plugins")}


def used_aliases() -> dict[str, set[str]]:
    used = {"versions": set(), "libraries": set(), "plugins": set()}
    for path in PROJECT.rglob("*.gradle.kts"):
        for chain, call in re.findall(r"\blibs((?:\.[A-Za-z][A-Za-z0-9]*)+)(\()?", "\n".join(code_lines(path))):
            parts = chain.lstrip(".").split(".")
            if call:  # libs.versions.x.get(): the last segment is the call
                parts = parts[:-1]
            section = parts[0] if parts[0] in ("versions", "plugins") else "libraries"
            used[section].add(".".join(parts[1:] if section != "libraries" else parts))
    return used


def test_version_catalog_parses_and_holds_exactly_the_aliases_the_builds_use():
    have, used = catalog_aliases(), used_aliases()
    for section in have:
        assert used[section] <= have[section], f"[{section}] lacks {sorted(used[section] - have[section])}"
    for section in ("libraries", "plugins"):  # a pinned but unused entry would mislead whoever updates versions
        assert have[section] <= used[section], f"[{section}] unused: {sorted(have[section] - used[section])}"
    settings = (PROJECT / "settings.gradle.kts").read_text()
    modules = re.findall(r'":(\w+)"', settings)
    assert sorted(modules) == ["app", "cosmoes"]
    assert all((PROJECT / m / "build.gradle.kts").is_file() for m in modules)
    wrapper = (PROJECT / "gradle" / "wrapper" / "gradle-wrapper.properties").read_text()
    assert re.search(r"distributionUrl=.*gradle-8\.[\d.]+-bin\.zip", wrapper)


def test_native_build_paths_and_targets_line_up():
    build = (PROJECT / "cosmoes" / "build.gradle.kts").read_text()
    cmake_lists = PROJECT / "cosmoes" / re.search(r'path = file\("([^"]+)"\)', build).group(1)
    cmake = cmake_lists.read_text()
    export = re.search(r'add_subdirectory\("\$\{CMAKE_CURRENT_SOURCE_DIR\}/([^"]+)"', cmake).group(1)
    assert (cmake_lists.parent / export / "CMakeLists.txt").resolve() == ROOT / "export" / "CMakeLists.txt"
    built = set(re.findall(r"add_library\((\w+) SHARED", cmake + (ROOT / "export" / "CMakeLists.txt").read_text()))
    targets = set(re.findall(r'"(\w+)"', re.search(r"targets \+= listOf\(([^)]*)\)", build).group(1)))
    assert targets and targets <= built, f"Gradle targets {sorted(targets - built)} are not shared libraries"
    # the shim's own sources and the library name Native.kt loads
    assert re.search(r"add_library\(cosmoes_jni SHARED cosmoes_jni\.cpp\)", cmake)
    assert (cmake_lists.parent / "cosmoes_jni.cpp").is_file()
    assert 'System.loadLibrary("cosmoes_jni")' in (LIBRARY / "kotlin" / "org" / "cosmoes" / "Native.kt").read_text()
    for variable in ("EXECUTORCH_ANDROID_PREFIX", "COSMOES_TOKENIZERS_SOURCE_DIR"):
        assert f"-D{variable}=" in build and f"set({variable} " in cmake


def bench_run_keys() -> list[str]:
    text = (LIBRARY / "kotlin" / "org" / "cosmoes" / "BenchRun.kt").read_text()
    return re.findall(r'"(\w+)"', re.search(r"val KEYS = listOf\(([^)]*)\)", text).group(1))


def test_bench_extras_are_bench_runs_keys():
    keys = set(bench_run_keys())
    assert {"bundle", "prompt", "stats"} <= keys
    # what `cosmoes bench --app` sends, what BenchActivity's header and the README show
    sent = set(APP_EXTRAS.values()) | set(APP_SWITCHES.values()) | {"bundle", "stats"}
    assert sent <= keys, f"cosmoes bench sends extras BenchRun refuses: {sorted(sent - keys)}"
    header = (APP_KOTLIN / "BenchActivity.kt").read_text()
    assert set(re.findall(r"--e[si] (\w+)", header)) <= keys
    readme = (PROJECT / "README.md").read_text()
    am_lines = [line for line in readme.splitlines() if "am start" in line and "BenchActivity" in line]
    assert am_lines, "README.md shows no am start line for BenchActivity"
    shown = {key for line in am_lines for key in re.findall(r"--es (\w+)", line)}
    assert shown <= keys and {"bundle", "prompt", "stats"} <= shown
    assert all(f"`{key}`" in readme for key in keys), "README.md must document every BenchActivity extra"


@pytest.fixture(scope="module")
def kotlinc_report(tmp_path_factory) -> tuple[list[str], Path]:
    """kotlinc's error lines for the library and app sources together (paths relative to the repository), one run
    (~15 s): the JVM-pure files must compile; the Android ones cannot, without android.jar and androidx."""
    env = tools()
    if isinstance(env, str):
        pytest.skip(env)
    lib = Path(env["KOTLIN_LIB"])
    classpath = ":".join([str(lib / "kotlin-stdlib.jar"), str(lib / "kotlinx-coroutines-core-jvm.jar"),
                          env["ANDROID_JSON_JAR"]])
    sources = [str(p.relative_to(ROOT)) for p in kotlin_files(LIBRARY / "kotlin") + kotlin_files(APP / "kotlin")]
    proc = subprocess.run([env["KOTLINC"], "-jvm-target", "17", "-cp", classpath,
                           "-d", str(tmp_path_factory.mktemp("kotlinc")), *sources],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "JAVA_HOME": str(JAVA_HOME)})
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if re.match(r"\S+\.kt:\d+:\d+: error:", line)]
    return errors, ROOT


def test_kotlinc_compiles_the_jvm_pure_sources_without_error(kotlinc_report):
    errors, root = kotlinc_report
    pure = {str(p.relative_to(root)) for p in jvm_pure_sources()}
    assert [e for e in errors if e.split(":")[0] in pure] == []


def test_android_sources_have_no_syntax_error_and_no_unknown_name_of_ours(kotlinc_report):
    errors, root = kotlinc_report
    android = [e for e in errors if e.startswith(str(APP_KOTLIN.relative_to(root)))]
    assert android, "kotlinc reported nothing for the Android sources: is android.jar on its classpath now?"
    assert [e for e in android if "syntax error" in e] == []
    for error in android:
        path = root / error.split(":")[0]
        imported = set(re.findall(r"^import androidx?\.[\w.]*\.(\w+)$", path.read_text(), re.M)) | {"android", "androidx"}
        name = re.search(r"unresolved reference '(\w+)'", error)
        if name:
            assert name.group(1) in imported | PLATFORM_MEMBERS, f"not an Android name: {error}"
        else:
            assert any(c in error for c in CASCADES), f"not a consequence of the missing android.jar: {error}"


def test_gradle_scripts_have_no_syntax_error(tmp_path):
    """The build scripts parse as Kotlin (kotlinc without Gradle's API: only syntax errors count). Copies with
    distinct names, since three files called build.gradle.kts would compile to one script class."""
    env = tools()
    if isinstance(env, str):
        pytest.skip(env)
    scripts = sorted(PROJECT.rglob("*.gradle.kts"))
    copies = []
    for script in scripts:
        copies.append(tmp_path / ("_".join(script.relative_to(PROJECT).parts)))
        copies[-1].write_text(script.read_text())
    proc = subprocess.run([env["KOTLINC"], "-d", str(tmp_path / "out"), *map(str, copies)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "JAVA_HOME": str(JAVA_HOME)})
    report = proc.stdout + proc.stderr
    assert len(scripts) == 4 and all(c.name in report for c in copies), report[-2000:]  # each script was analysed
    assert [line for line in report.splitlines() if "syntax error" in line] == []
