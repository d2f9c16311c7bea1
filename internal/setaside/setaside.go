// Package setaside keeps a state file egressd refused to read (its
// format, its contents, a clock it does not trust) beside it, under a
// numbered name of its own (NAME.refused.1, NAME.refused.2, ...), out of
// the way of the next write and for the operator to see what was
// refused: a later refusal does not overwrite an earlier one's file. At
// most Max are kept, the lowest numbered (oldest) removed first, so that
// a loop of refusals (a crash loop, a clock that keeps going back)
// cannot fill the disk. A NAME.refused an egressd before the numbers
// left is neither counted nor removed.
package setaside

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// Suffix is what a kept file's name adds to the refused one's, before
// its number.
const Suffix = ".refused"

// Max is how many refused files of one name are kept.
const Max = 8

// Keep renames the file at path to the next numbered name beside it and
// removes the oldest kept beyond Max. It returns the name it was kept
// under (without the directory), for the log line that says where it
// went.
func Keep(path string) (string, error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	nums, err := kept(dir, base)
	if err != nil {
		return "", fmt.Errorf("setaside: %w", err)
	}
	next := 1
	if len(nums) > 0 {
		next = nums[len(nums)-1] + 1
	}
	name := base + Suffix + "." + strconv.Itoa(next)
	if err := os.Rename(path, filepath.Join(dir, name)); err != nil {
		return "", fmt.Errorf("setaside: %w", err)
	}
	nums = append(nums, next)
	for len(nums) > Max {
		// Best effort: one left over is removed at the next Keep.
		os.Remove(filepath.Join(dir, base+Suffix+"."+strconv.Itoa(nums[0])))
		nums = nums[1:]
	}
	return name, nil
}

// kept returns the numbers of base's kept files in dir, ascending.
func kept(dir, base string) ([]int, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var nums []int
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), base+Suffix+".")
		if !ok {
			continue
		}
		if n, err := strconv.Atoi(rest); err == nil && n > 0 && strconv.Itoa(n) == rest {
			nums = append(nums, n)
		}
	}
	slices.Sort(nums)
	return nums, nil
}
