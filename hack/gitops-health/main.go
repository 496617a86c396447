// gitops-health reads Kubernetes objects (JSON: one per line, concatenated, a JSON array or a
// kubectl List) on stdin and prints, per object, one JSON line with the health three GitOps tools
// would give it:
//
//   - kstatus: sigs.k8s.io/cli-utils/pkg/kstatus/status.Compute, what Flux (without
//     healthCheckExprs), kubectl-based tools and cli-utils' appliers read;
//   - argo: the Argo CD health.lua script for the object's group and kind, run with gopher-lua the
//     way Argo CD runs resource.customizations.health scripts (global `obj`, only the base, table
//     and package libraries, a one-second limit; the returned table's status and message);
//   - flux: the Flux Kustomization healthCheckExprs entry for the object's apiVersion and kind,
//     evaluated with cel-go in Flux's order (an unobserved generation is InProgress, then
//     inProgress, failed, current; none true is InProgress; an evaluation error is Unknown).
//
// Usage: gitops-health [--argo-dir DIR] [--flux FILE] < objects.json
//
// DIR holds <group>_<Kind>.lua files (the suffix of Argo CD's resource.customizations.health.<group>_<Kind>
// key); FILE is YAML with a top-level healthCheckExprs list, as under a Kustomization's spec.
// Kinds without a script or an entry get null for that tool. See docs/operator.md, "GitOps".
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/cel-go/cel"
	"github.com/google/cel-go/common/types"
	"github.com/google/cel-go/ext"
	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
	"sigs.k8s.io/yaml"
)

// Verdict is one tool's reading of one object.
type Verdict struct {
	Status  string `json:"status"`
	Message string `json:"message,omitempty"`
	Error   string `json:"error,omitempty"`
}

// Report is the output line of one object.
type Report struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Namespace  string   `json:"namespace,omitempty"`
	Name       string   `json:"name"`
	Kstatus    Verdict  `json:"kstatus"`
	Argo       *Verdict `json:"argo"`
	Flux       *Verdict `json:"flux"`
}

type fluxCheck struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Current    string `json:"current"`
	InProgress string `json:"inProgress,omitempty"`
	Failed     string `json:"failed,omitempty"`
}

type fluxFile struct {
	HealthCheckExprs []fluxCheck `json:"healthCheckExprs"`
}

type compiledCheck struct {
	inProgress, failed, current cel.Program
}

func main() {
	argoDir := flag.String("argo-dir", "", "directory of Argo CD health scripts named <group>_<Kind>.lua")
	fluxPath := flag.String("flux", "", "YAML file with a top-level healthCheckExprs list (Flux Kustomization)")
	flag.Parse()
	checks, err := loadFlux(*fluxPath)
	if err != nil {
		fail(err)
	}
	objects, err := readObjects(os.Stdin)
	if err != nil {
		fail(err)
	}
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	encoder := json.NewEncoder(out)
	for _, obj := range objects {
		report, err := assess(obj, *argoDir, checks)
		if err != nil {
			fail(err)
		}
		if err := encoder.Encode(report); err != nil {
			fail(err)
		}
	}
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "gitops-health: %v\n", err)
	os.Exit(2)
}

// readObjects decodes every JSON value on r; arrays and kubectl Lists are flattened into their items.
func readObjects(r io.Reader) ([]*unstructured.Unstructured, error) {
	decoder := json.NewDecoder(r)
	var objects []*unstructured.Unstructured
	for index := 0; ; index++ {
		var raw json.RawMessage
		if err := decoder.Decode(&raw); errors.Is(err, io.EOF) {
			return objects, nil
		} else if err != nil {
			return nil, fmt.Errorf("input value %d is not JSON: %w", index+1, err)
		}
		found, err := flatten(raw)
		if err != nil {
			return nil, fmt.Errorf("input value %d: %w", index+1, err)
		}
		objects = append(objects, found...)
	}
}

func flatten(raw json.RawMessage) ([]*unstructured.Unstructured, error) {
	trimmed := bytes.TrimSpace(raw)
	if len(trimmed) > 0 && trimmed[0] == '[' {
		var items []json.RawMessage
		if err := json.Unmarshal(trimmed, &items); err != nil {
			return nil, err
		}
		var all []*unstructured.Unstructured
		for _, item := range items {
			found, err := flatten(item)
			if err != nil {
				return nil, err
			}
			all = append(all, found...)
		}
		return all, nil
	}
	var head struct {
		Kind  string            `json:"kind"`
		Items []json.RawMessage `json:"items"`
	}
	if err := json.Unmarshal(trimmed, &head); err != nil {
		return nil, fmt.Errorf("not a Kubernetes object: %w", err)
	}
	if strings.HasSuffix(head.Kind, "List") && head.Items != nil {
		return flatten(json.RawMessage("[" + string(bytes.Join(itemsBytes(head.Items), []byte(","))) + "]"))
	}
	obj := &unstructured.Unstructured{}
	if err := obj.UnmarshalJSON(trimmed); err != nil {
		return nil, fmt.Errorf("not a Kubernetes object: %w", err)
	}
	return []*unstructured.Unstructured{obj}, nil
}

func itemsBytes(items []json.RawMessage) [][]byte {
	out := make([][]byte, len(items))
	for i, item := range items {
		out[i] = item
	}
	return out
}

func assess(obj *unstructured.Unstructured, argoDir string, checks map[string]*compiledCheck) (*Report, error) {
	report := &Report{
		APIVersion: obj.GetAPIVersion(),
		Kind:       obj.GetKind(),
		Namespace:  obj.GetNamespace(),
		Name:       obj.GetName(),
	}
	result, err := status.Compute(obj)
	if err != nil {
		report.Kstatus = Verdict{Status: "Unknown", Error: err.Error()}
	} else {
		report.Kstatus = Verdict{Status: result.Status.String(), Message: result.Message}
	}
	if argoDir != "" {
		script := filepath.Join(argoDir, obj.GroupVersionKind().Group+"_"+obj.GetKind()+".lua")
		source, err := os.ReadFile(script)
		switch {
		case err == nil:
			report.Argo = argoHealth(obj, string(source))
		case !errors.Is(err, os.ErrNotExist):
			return nil, err
		}
	}
	if check := checks[obj.GetAPIVersion()+"/"+obj.GetKind()]; check != nil {
		report.Flux = fluxHealth(obj, check)
	}
	return report, nil
}

// --- Argo CD -------------------------------------------------------------------------------------

var argoStatuses = map[string]bool{
	"Healthy": true, "Progressing": true, "Degraded": true, "Suspended": true, "Missing": true, "Unknown": true,
}

func argoHealth(obj *unstructured.Unstructured, script string) *Verdict {
	// Argo CD reads an object being deleted as Progressing before any script runs.
	if obj.GetDeletionTimestamp() != nil {
		return &Verdict{Status: "Progressing", Message: "Pending deletion"}
	}
	state := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer state.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
	} {
		state.Push(state.NewFunction(lib.open))
		state.Push(lua.LString(lib.name))
		state.Call(1, 0)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	state.SetContext(ctx)
	state.SetGlobal("obj", toLua(state, obj.Object))
	if err := state.DoString(script); err != nil {
		return &Verdict{Status: "Unknown", Error: err.Error()}
	}
	returned, ok := state.Get(-1).(*lua.LTable)
	if !ok {
		return &Verdict{Status: "Unknown", Error: "the script did not return a table"}
	}
	verdict := &Verdict{Status: lua.LVAsString(returned.RawGetString("status")), Message: lua.LVAsString(returned.RawGetString("message"))}
	if !argoStatuses[verdict.Status] {
		return &Verdict{Status: "Unknown", Error: fmt.Sprintf("the script returned the status %q, which Argo CD does not know", verdict.Status)}
	}
	return verdict
}

func toLua(state *lua.LState, value any) lua.LValue {
	switch v := value.(type) {
	case nil:
		return lua.LNil
	case bool:
		return lua.LBool(v)
	case string:
		return lua.LString(v)
	case int64:
		return lua.LNumber(v)
	case float64:
		return lua.LNumber(v)
	case map[string]any:
		table := state.NewTable()
		for key, item := range v {
			table.RawSetString(key, toLua(state, item))
		}
		return table
	case []any:
		table := state.NewTable()
		for _, item := range v {
			table.Append(toLua(state, item))
		}
		return table
	default:
		return lua.LString(fmt.Sprint(v))
	}
}

// --- Flux ----------------------------------------------------------------------------------------

func loadFlux(path string) (map[string]*compiledCheck, error) {
	checks := map[string]*compiledCheck{}
	if path == "" {
		return checks, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var file fluxFile
	if err := yaml.UnmarshalStrict(data, &file); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	env, err := cel.NewEnv(
		cel.HomogeneousAggregateLiterals(),
		cel.EagerlyValidateDeclarations(true),
		cel.DefaultUTCTimeZone(true),
		cel.CrossTypeNumericComparisons(true),
		cel.OptionalTypes(),
		ext.Strings(),
		ext.Sets(),
		ext.Encoders(),
	)
	if err != nil {
		return nil, err
	}
	program := func(kind, field, expr string) (cel.Program, error) {
		if expr == "" {
			return nil, nil
		}
		// Flux parses (it cannot type-check against arbitrary CRDs) and evaluates over the object.
		ast, issues := env.Parse(expr)
		if issues != nil && issues.Err() != nil {
			return nil, fmt.Errorf("%s: %s of %s: %w", path, field, kind, issues.Err())
		}
		return env.Program(ast, cel.EvalOptions(cel.OptOptimize), cel.InterruptCheckFrequency(100))
	}
	for _, entry := range file.HealthCheckExprs {
		if entry.Current == "" {
			return nil, fmt.Errorf("%s: the entry for %s has no current expression", path, entry.Kind)
		}
		compiled := &compiledCheck{}
		for _, part := range []struct {
			field string
			expr  string
			into  *cel.Program
		}{
			{"inProgress", entry.InProgress, &compiled.inProgress},
			{"failed", entry.Failed, &compiled.failed},
			{"current", entry.Current, &compiled.current},
		} {
			prog, err := program(entry.Kind, part.field, part.expr)
			if err != nil {
				return nil, err
			}
			*part.into = prog
		}
		checks[entry.APIVersion+"/"+entry.Kind] = compiled
	}
	return checks, nil
}

func fluxHealth(obj *unstructured.Unstructured, check *compiledCheck) *Verdict {
	observed, found, err := unstructured.NestedInt64(obj.Object, "status", "observedGeneration")
	if err != nil {
		return &Verdict{Status: "Unknown", Error: err.Error()}
	}
	if found && observed != obj.GetGeneration() {
		return &Verdict{Status: "InProgress", Message: fmt.Sprintf("generation %d, observed %d", obj.GetGeneration(), observed)}
	}
	for _, step := range []struct {
		prog   cel.Program
		status string
	}{
		{check.inProgress, "InProgress"},
		{check.failed, "Failed"},
		{check.current, "Current"},
	} {
		if step.prog == nil {
			continue
		}
		value, _, err := step.prog.ContextEval(context.Background(), obj.Object)
		if err != nil {
			return &Verdict{Status: "Unknown", Error: err.Error()}
		}
		result, ok := value.(types.Bool)
		if !ok {
			return &Verdict{Status: "Unknown", Error: fmt.Sprintf("the %s expression is not a boolean", step.status)}
		}
		if result {
			return &Verdict{Status: step.status}
		}
	}
	return &Verdict{Status: "InProgress", Message: "no expression is true"}
}
