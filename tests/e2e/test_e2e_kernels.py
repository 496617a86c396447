"""The code-interpreter image's kernels and chart data, through the real gateway, operator and
container node, with the unmodified `e2b_code_interpreter` SDK (docs/agent.md, "Languages"):
JavaScript and TypeScript (Deno), R (IRkernel), bash (bash_kernel) beside Python; per-execution
envs in each language; matplotlib figures come back with structured `chart` data."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2b import SandboxException
from e2b_code_interpreter import Sandbox as CodeSandbox
from e2b_code_interpreter.charts import BarChart, ChartType, LineChart
from e2elib import Gateway

# Well above a kernel's first start in the image (Deno's and R's take a few seconds on 2 cores).
RUN_TIMEOUT = 120

BAR_CHART = """
import matplotlib.pyplot as plt
plt.figure(figsize=(6, 4))
plt.bar(['Author A', 'Author B', 'Author C'], [100, 200, 300], label='Books Sold')
plt.xlabel('Authors')
plt.ylabel('Number of Books Sold')
plt.title('Book Sales by Authors')
plt.show()
"""


@pytest.fixture(scope="module")
def sandbox(gateway: Gateway) -> Iterator[CodeSandbox]:
    sbx = CodeSandbox.create(envs={"TEMPLATE_WIDE": "everywhere"}, **gateway.sdk())
    try:
        yield sbx
    finally:
        sbx.kill()


def test_javascript_and_typescript_run_in_deno(sandbox: CodeSandbox) -> None:
    hello = sandbox.run_code("console.log('Hello, World!')", language="js", timeout=RUN_TIMEOUT)
    assert hello.error is None and hello.logs.stdout == ["Hello, World!\n"]
    esm = sandbox.run_code("import { readFileSync } from 'fs'\nconsole.log(typeof readFileSync)", language="js")
    assert esm.logs.stdout == ["function\n"]
    awaited = sandbox.run_code("await Promise.resolve('Hello World!')", language="js")
    assert awaited.text == "Hello World!"
    typed = sandbox.run_code("const message: string = 'typed'; console.log(message)", language="ts")
    assert typed.logs.stdout == ["typed\n"]
    failed = sandbox.run_code("throw new Error('boom')", language="js")
    assert failed.error is not None and "boom" in failed.error.value
    # State stays in the language's default context.
    sandbox.run_code("globalThis.kept = 41", language="js")
    assert sandbox.run_code("kept + 1", language="js").text == "42"


def test_every_javascript_result_arrives(sandbox: CodeSandbox) -> None:
    # Deno's kernel publishes a result after its idle status now and then (docs/agent.md,
    # "Languages"): 30 in a row all arriving is what the agent's probe of the kernel makes sure of.
    texts = [sandbox.run_code(f"{n} * 2", language="js", timeout=RUN_TIMEOUT).text for n in range(30)]
    assert texts == [str(n * 2) for n in range(30)]


def test_r_runs_in_irkernel(sandbox: CodeSandbox) -> None:
    printed = sandbox.run_code('print("Hello, World!")', language="r", timeout=RUN_TIMEOUT)
    assert printed.error is None and printed.logs.stdout == ['[1] "Hello, World!"\n']
    failed = sandbox.run_code('stop("boom")', language="r")
    assert failed.error is not None and "boom" in failed.error.value


def test_bash_runs_in_bash_kernel(sandbox: CodeSandbox) -> None:
    where = sandbox.run_code("pwd", language="bash", timeout=RUN_TIMEOUT)
    assert where.error is None and where.logs.stdout == ["/home/user\n"]
    failed = sandbox.run_code("false", language="bash")
    assert failed.error is not None


@pytest.mark.parametrize(
    ("language", "read", "read_or_default", "shown"),
    [
        ("python", "import os; os.environ['FOO']", "os.environ.get('FOO', 'default')", "text"),
        ("js", "process.env.FOO", "process.env.FOO || 'default'", "text"),
        # IRkernel shows a value as display data, not as the execution's main result.
        ("r", "Sys.getenv('FOO')", "Sys.getenv('FOO', unset = 'default')", "results"),
        ("bash", "echo $FOO", "echo ${FOO:-default}", "stdout"),
    ],
)
def test_envs_of_one_execution_stay_in_it(
    sandbox: CodeSandbox, language: str, read: str, read_or_default: str, shown: str
) -> None:
    def output(code: str, **envs: str) -> str:
        execution = sandbox.run_code(code, language=language, envs=envs or None, timeout=RUN_TIMEOUT)
        assert execution.error is None, execution.error
        text: str | None = {
            "text": execution.text,
            "results": execution.results[0].text if execution.results else None,
            "stdout": "".join(execution.logs.stdout),
        }[shown]
        assert text is not None
        return text.strip().removeprefix("[1] ").strip('"')

    assert output(read, FOO="bar & baz") == "bar & baz"  # quoting of awkward values: the unit tests
    assert output(read_or_default) == "default"
    # The sandbox's own envs reach every kernel, and one execution's value does not stick.
    wide = {"python": "os.environ['TEMPLATE_WIDE']", "js": "process.env.TEMPLATE_WIDE"}.get(
        language, read.replace("FOO", "TEMPLATE_WIDE")
    )
    assert output(wide, TEMPLATE_WIDE="overwritten") == "overwritten"
    assert output(wide) == "everywhere"


def test_a_language_without_a_kernel_is_refused_clearly(sandbox: CodeSandbox) -> None:
    with pytest.raises(SandboxException, match="language 'java' is not available") as refused:
        sandbox.run_code('System.out.println("hi")', language="java")
    assert "400" in str(refused.value) and "deno, ir, python3" in str(refused.value)


def test_matplotlib_figures_carry_chart_data(sandbox: CodeSandbox) -> None:
    execution = sandbox.run_code(BAR_CHART, timeout=RUN_TIMEOUT)
    assert execution.error is None, execution.error
    (result,) = execution.results
    assert result.png  # the picture stays
    chart = result.chart
    assert isinstance(chart, BarChart) and chart.type == ChartType.BAR
    assert (chart.title, chart.x_label, chart.y_label) == ("Book Sales by Authors", "Authors", "Number of Books Sold")
    assert [(bar.label, bar.value, bar.group) for bar in chart.elements] == [
        ("Author A", 100, "Books Sold"),
        ("Author B", 200, "Books Sold"),
        ("Author C", 300, "Books Sold"),
    ]
    line = sandbox.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [4, 5, 6])\nplt.show()")
    assert isinstance(line.results[0].chart, LineChart)
    assert [list(point) for point in line.results[0].chart.elements[0].points] == [[1, 4], [2, 5], [3, 6]]
    # A figure with nothing drawn is a picture only, and a value that is no figure has no chart.
    blank = sandbox.run_code("import matplotlib.pyplot as plt\nplt.figure()\nplt.show()")
    assert all(r.chart is None for r in blank.results)
    assert sandbox.run_code("1 + 1").results[0].chart is None


def test_dataframes_carry_their_data(sandbox: CodeSandbox) -> None:
    execution = sandbox.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2, 3], 'b': ['x', None, 'z']})")
    assert execution.error is None, execution.error
    (result,) = execution.results
    assert result.data == {"a": [1, 2, 3], "b": ["x", None, "z"]}
    assert result.html and "<table" in result.html  # pandas' own representations stay


def test_pil_images_shown_or_saved_come_back_as_png(sandbox: CodeSandbox) -> None:
    code = (
        "import numpy\nfrom PIL import Image\n"
        "image = Image.fromarray((numpy.random.rand(8, 8, 3) * 255).astype('uint8')).convert('RGBA')\n"
        "image.show()\nimage.save('shown.png')\nprint('done')"
    )
    execution = sandbox.run_code(code)
    assert execution.error is None, execution.error
    assert len(execution.results) == 2 and all(result.png for result in execution.results)
    assert execution.logs.stdout == ["done\n"]
    assert sandbox.files.exists("/home/user/shown.png")


def test_default_contexts_are_listed_first(gateway: Gateway) -> None:
    fresh = CodeSandbox.create(**gateway.sdk())
    try:
        created = fresh.create_code_context()
        contexts = fresh.list_code_contexts()
        assert [context.language for context in contexts[:2]] == ["python", "javascript"]
        assert contexts[-1].id == created.id
        # Removing a default context works; running code without one makes a new default.
        fresh.remove_code_context(contexts[1].id)
        assert fresh.run_code("1 + 2", language="js").text == "3"
    finally:
        fresh.kill()


def test_a_cwd_the_sandbox_user_cannot_enter_is_refused(sandbox: CodeSandbox) -> None:
    with pytest.raises(SandboxException, match=r"400.*'/root' is not accessible"):
        sandbox.create_code_context(cwd="/root")
