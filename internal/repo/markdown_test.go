package repo

import (
	"slices"
	"testing"
)

func TestCodeBlocksAndCommands(t *testing.T) {
	md := "text\n```sh\nmake demo   # the demo\n# a comment\n\nA=1 B='x # y' \\\n  tool add  net /p\n```\n\n```json\n{\"a\": 1}\n```\n"
	blocks := CodeBlocks(md)
	if len(blocks) != 2 || blocks[0].Lang != "sh" || blocks[0].Line != 2 || blocks[1].Lang != "json" || blocks[1].Text != `{"a": 1}` {
		t.Fatalf("CodeBlocks = %+v", blocks)
	}
	got := Commands(blocks[0].Text)
	want := []string{"make demo", "A=1 B='x # y'  tool add  net /p"}
	if !slices.Equal(got, want) {
		t.Errorf("Commands = %q, want %q", got, want)
	}
}
