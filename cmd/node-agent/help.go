package main

import (
	"bytes"
	"fmt"
	"strings"
	"unicode"

	"github.com/spf13/cobra"
	flag "github.com/spf13/pflag"
	"k8s.io/kubectl/pkg/util/templates"
	"k8s.io/kubectl/pkg/util/term"
)

// kubectl's help layout for the workstation commands, written out in Go rather than
// through kubectl's templater (templates.ActsAsRootCommand, UseOptionsTemplates): that
// one executes text/template, whose reflect.Value.MethodByName makes the linker keep
// every exported method of every type in the binary. Without it the stripped binary
// went from 65 to 36 MB and an agent's resident memory fell by about 10 MiB
// (docs/BENCHMARKS.md, "One agent's footprint"). The layout is kubectl's
// (templates.MainUsageTemplate's sections); the flags are printed by kubectl's own
// templates.HelpFlagPrinter.

// useKubectlHelp gives root and its commands kubectl's help and usage layout, and the
// options command the list of the flags every command shares.
func useKubectlHelp(root, options *cobra.Command) {
	root.SetHelpFunc(func(c *cobra.Command, _ []string) {
		out := term.NewResponsiveWriter(c.OutOrStdout())
		text := c.Long
		if text == "" {
			text = c.Short
		}
		fmt.Fprint(out, strings.TrimSpace(text))
		if c.Runnable() || c.HasSubCommands() {
			fmt.Fprint(out, kubectlUsage(c))
		}
		fmt.Fprintln(out)
	})
	root.SetUsageFunc(func(c *cobra.Command) error {
		_, err := fmt.Fprint(term.NewResponsiveWriter(c.OutOrStderr()), kubectlUsage(c))
		return err
	})
	options.SetHelpFunc(func(c *cobra.Command, _ []string) {
		_ = c.Usage()
	})
	options.SetUsageFunc(func(c *cobra.Command) error {
		if !c.HasInheritedFlags() {
			return nil
		}
		_, err := fmt.Fprint(term.NewResponsiveWriter(c.OutOrStderr()),
			"The following options can be passed to any command:\n\n"+flagUsages(c.InheritedFlags()))
		return err
	})
}

// kubectlUsage is kubectl's usage of c: its examples, subcommands, own options, usage line,
// and where to find the shared options.
func kubectlUsage(c *cobra.Command) string {
	var b strings.Builder
	if c.HasExample() {
		fmt.Fprintf(&b, "Examples:\n%s\n\n", strings.TrimRightFunc(c.Example, unicode.IsSpace))
	}
	if c.HasAvailableSubCommands() {
		b.WriteString("Available Commands:")
		for _, sub := range c.Commands() {
			if sub.IsAvailableCommand() && sub.Name() != "options" {
				fmt.Fprintf(&b, "\n  %-*s   %s", sub.NamePadding(), sub.Name(), sub.Short)
			}
		}
		b.WriteString("\n\n")
	}
	if own := ownFlags(c); own.HasAvailableFlags() {
		fmt.Fprintf(&b, "Options:\n%s\n\n", strings.TrimRightFunc(flagUsages(own), unicode.IsSpace))
	}
	if c.Runnable() && c.UseLine() != "" && c.HasParent() {
		line := c.UseLine()
		if c.HasFlags() && !strings.Contains(line, "[options]") {
			line += " [options]"
		}
		fmt.Fprintf(&b, "Usage:\n  %s\n\n", line)
	}
	if c.HasSubCommands() {
		fmt.Fprintf(&b, "Use \"%s <command> --help\" for more information about a given command.\n", c.CommandPath())
	}
	if c.Runnable() {
		if opts, _, err := c.Root().Find([]string{"options"}); err == nil && opts != c.Root() {
			fmt.Fprintf(&b, "Use \"%s\" for a list of global command-line options (applies to all commands).\n", opts.CommandPath())
		}
	}
	return strings.TrimRightFunc("\n\n"+b.String(), unicode.IsSpace)
}

// ownFlags are c's local flags that are not shared with every command, --help aside.
func ownFlags(c *cobra.Command) *flag.FlagSet {
	own := flag.NewFlagSet("own", flag.ContinueOnError)
	shared := c.PersistentFlags()
	c.LocalFlags().VisitAll(func(f *flag.Flag) {
		if f.Name != "help" && shared.Lookup(f.Name) == nil {
			own.AddFlag(f)
		}
	})
	return own
}

// flagUsages prints the visible flags of f as kubectl does.
func flagUsages(f *flag.FlagSet) string {
	var buf bytes.Buffer
	limit, err := term.GetWordWrapperLimit()
	if err != nil {
		limit = 0
	}
	printer := templates.NewHelpFlagPrinter(&buf, limit)
	f.VisitAll(func(fl *flag.Flag) {
		if !fl.Hidden {
			printer.PrintHelpFlag(fl)
		}
	})
	return buf.String()
}
