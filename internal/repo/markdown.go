package repo

import (
	"regexp"
	"strings"
)

// Block is a fenced code block of a Markdown file.
type Block struct {
	Lang string // what follows the opening fence: "sh", "json", ...
	Line int    // line of the opening fence, from 1
	Text string // the lines between the fences
}

var fenceRE = regexp.MustCompile("^ {0,3}(```+)\\s*([A-Za-z0-9_+-]*)")

// CodeBlocks returns the fenced code blocks of a Markdown text, in order.
func CodeBlocks(md string) []Block {
	var blocks []Block
	var cur *Block
	var fence string
	var body []string
	for i, line := range strings.Split(md, "\n") {
		m := fenceRE.FindStringSubmatch(line)
		switch {
		case cur == nil && m != nil:
			cur, fence, body = &Block{Lang: m[2], Line: i + 1}, m[1], nil
		case cur != nil && m != nil && m[1] == fence && m[2] == "":
			cur.Text = strings.Join(body, "\n")
			blocks = append(blocks, *cur)
			cur = nil
		case cur != nil:
			body = append(body, line)
		}
	}
	return blocks
}

// Commands splits a shell block into commands: continuation lines joined,
// comments (from " #" or a leading "#") and empty lines dropped.
func Commands(block string) []string {
	var cmds []string
	var cur string
	for _, line := range strings.Split(block, "\n") {
		if i := strings.Index(line, " #"); i >= 0 && !strings.ContainsAny(line[:i], `'"`) {
			line = line[:i]
		}
		if strings.HasPrefix(strings.TrimSpace(line), "#") {
			line = ""
		}
		line = strings.TrimSpace(line)
		if cont, ok := strings.CutSuffix(line, `\`); ok {
			cur += cont + " "
			continue
		}
		cur += line
		if c := strings.TrimSpace(cur); c != "" {
			cmds = append(cmds, c)
		}
		cur = ""
	}
	return cmds
}
